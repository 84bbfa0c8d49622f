"""Picard (fixed-point) iteration, optionally damped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_unit_interval
from ._solver import FixedPointSolver, Fn, State

__all__ = ["Picard"]


@dataclass(frozen=True)
class Picard(FixedPointSolver):
    """Damped Picard iteration: z <- (1 - beta) z + beta f(z).

    With beta = 1 this is z <- f(z), i.e. explicit Euler with dt = 1 on dz/dt = f(z) - z; it
    converges when f is a contraction (spectral radius of df/dz < 1 at z*). Damping
    (0 < beta < 1) is explicit Euler with dt = beta: it converges whenever the eigenvalues
    mu of df/dz satisfy |1 + beta (mu - 1)| < 1.

    Arguments:
        damping: beta in (0, 1].

    Raises:
        ValueError / TypeError: damping outside (0, 1] or not a number.

    One evaluation of f per step. Reference: Kelley, "Iterative Methods for Linear and
    Nonlinear Equations", SIAM 1995, ch. 4.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        check_unit_interval("damping", self.damping)

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        return {"z": z, "fz": fz}

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int]:
        if self.damping == 1.0:
            z = state["fz"]
        else:
            z = torch.lerp(state["z"], state["fz"], self.damping)
        return {"z": z, "fz": fn(z)}, 1
