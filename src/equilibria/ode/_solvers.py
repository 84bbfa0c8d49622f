"""Solver objects: small frozen dataclasses naming an explicit Runge–Kutta method.

Pass them to `odeint(..., solver=Tsit5())`. Each has ``.tableau`` (its checked
`ButcherTableau`) and ``.adaptive`` (whether it has an embedded error estimate, i.e. whether
odeint controls its step size; fixed-step methods need ``dt0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._tableau import BOSH3, DOPRI5, DOPRI8, EULER, HEUN, MIDPOINT, RK4, TSIT5, ButcherTableau

__all__ = [
    "Bosh3",
    "Dopri5",
    "Dopri8",
    "Euler",
    "ExplicitRK",
    "Heun",
    "Midpoint",
    "RK4",
    "RungeKutta",
    "Tsit5",
]


class RungeKutta:
    """Base of the solver objects: an explicit Runge–Kutta method given by its tableau."""

    tableau: ButcherTableau

    @property
    def adaptive(self) -> bool:
        """True when the method has an embedded pair (odeint then controls dt per sample)."""
        return self.tableau.adaptive

    @property
    def order(self) -> int:
        return self.tableau.order


@dataclass(frozen=True)
class Euler(RungeKutta):
    """Explicit Euler, order 1, fixed step (needs dt0)."""

    tableau: ClassVar[ButcherTableau] = EULER


@dataclass(frozen=True)
class Midpoint(RungeKutta):
    """Explicit midpoint rule, order 2, fixed step (needs dt0)."""

    tableau: ClassVar[ButcherTableau] = MIDPOINT


@dataclass(frozen=True)
class Heun(RungeKutta):
    """Heun's method (explicit trapezoidal rule), order 2, fixed step (needs dt0)."""

    tableau: ClassVar[ButcherTableau] = HEUN


@dataclass(frozen=True)
class RK4(RungeKutta):
    """The classical fourth-order Runge–Kutta method, fixed step (needs dt0)."""

    tableau: ClassVar[ButcherTableau] = RK4


@dataclass(frozen=True)
class Bosh3(RungeKutta):
    """Bogacki–Shampine 3(2), FSAL, adaptive; dense output by cubic Hermite interpolation."""

    tableau: ClassVar[ButcherTableau] = BOSH3


@dataclass(frozen=True)
class Dopri5(RungeKutta):
    """Dormand–Prince 5(4), FSAL, adaptive; Shampine's 4th-order dense output."""

    tableau: ClassVar[ButcherTableau] = DOPRI5


@dataclass(frozen=True)
class Dopri8(RungeKutta):
    """Prince–Dormand 8(7), 13 stages + FSAL, adaptive; for tight tolerances (rtol <= 1e-8).
    Dense output (t_eval, events) of order 7 (local error O(dt^8)), on 5 extra stages that
    are evaluated only for the samples whose step holds a t_eval point strictly inside it or
    an event: a solve without them costs nothing more, one with a point in every step 5 of
    every 18 evaluations more."""

    tableau: ClassVar[ButcherTableau] = DOPRI8


@dataclass(frozen=True)
class Tsit5(RungeKutta):
    """Tsitouras 5(4), FSAL, adaptive; Tsitouras' 4th-order dense output."""

    tableau: ClassVar[ButcherTableau] = TSIT5


@dataclass(frozen=True)
class ExplicitRK(RungeKutta):
    """Any explicit method given by a user's `ButcherTableau`.

    Arguments:
        tableau: the checked tableau; adaptive when it has ``b_err``.

    Raises:
        TypeError: when `tableau` is not a ButcherTableau.
    """

    tableau: ButcherTableau

    def __post_init__(self) -> None:
        if not isinstance(self.tableau, ButcherTableau):
            raise TypeError(
                f"ExplicitRK(tableau=...) needs a ButcherTableau, got "
                f"{type(self.tableau).__name__}."
            )
