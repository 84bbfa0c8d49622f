"""equilibria.equilibrium: fixed_point() and its solvers."""

from ._anderson import Anderson as Anderson
from ._loop import fixed_point as fixed_point
from ._picard import Picard as Picard
from ._solver import FixedPointSolver as FixedPointSolver
