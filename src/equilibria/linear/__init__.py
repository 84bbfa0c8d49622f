"""equilibria.linear: matrix-free batched linear solvers (GMRES)."""

from ._gmres import GMRES as GMRES
