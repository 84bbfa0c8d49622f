"""Tableaus of ESDIRK methods (explicit first stage, singly diagonally implicit), as checked data.

An s-stage ESDIRK method with diagonal gamma solves, for i = 2..s,

    z_i = y + dt sum_{j<i} a_ij k_j + dt gamma k_i,    k_i = f(t + c_i dt, z_i),

with k_1 = f(t, y). The methods here are *stiffly accurate*: the last row of A is b, so
y_new = z_s and k_s = f(t + dt, y_new) is the next step's k_1 (first same as last). The
embedded solution uses the weights b_hat = b - b_err; its difference from y_new,
dt sum_i b_err_i k_i, is the local error estimate.

Every tableau is checked in float64 when it is built (row 1 is explicit, the diagonal is a
single gamma > 0, sum_j a_ij = c_i, c_s = 1, sum b = 1, sum b_err = 0), so that a typo
fails at import; the order conditions and L-stability are checked in the tests.

Reference: Kværnø, "Singly diagonally implicit Runge–Kutta methods with an explicit first
stage", BIT 44 (2004); Kennedy & Carpenter, "Diagonally implicit Runge–Kutta methods for
ordinary differential equations. A review", NASA/TM-2016-219173.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["KVAERNO3", "KVAERNO5", "ESDIRKTableau"]

_CONSISTENCY_TOL = 1e-12


@dataclass(frozen=True)
class ESDIRKTableau:
    """A stiffly accurate ESDIRK tableau with an embedded pair, checked at construction.

    Arguments:
        name: a human name ("Kvaerno3").
        c: nodes, length s, c[0] = 0, c[-1] = 1.
        a: the lower-triangular matrix with its diagonal, as rows; row i has length i + 1;
            row 0 is (0.0,) (the explicit first stage), a[i][i] = gamma for i >= 1.
        b_err: b - b_hat (main minus embedded weights), length s, summing to 0.
        order: order of the main solution; error_order: of the embedded one.

    Raises:
        ValueError: when a shape or a consistency condition fails, naming it.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b_err: tuple[float, ...]
    order: int
    error_order: int

    def __post_init__(self) -> None:
        s = len(self.a)
        if s < 2:
            raise ValueError(f"{self.name}: an ESDIRK tableau needs at least two stages.")
        if any(len(row) != i + 1 for i, row in enumerate(self.a)):
            raise ValueError(
                f"{self.name}: row i of a must have length i + 1 (the diagonal included); got "
                f"row lengths {[len(row) for row in self.a]}."
            )
        if self.a[0][0] != 0.0:
            raise ValueError(f"{self.name}: the first stage must be explicit (a[0][0] = 0).")
        gamma = self.a[1][1]
        if not gamma > 0 or any(row[-1] != gamma for row in self.a[1:]):
            raise ValueError(
                f"{self.name}: the diagonal a[i][i] (i >= 1) must be one gamma > 0; got "
                f"{[row[-1] for row in self.a[1:]]}."
            )
        if len(self.c) != s or self.c[0] != 0.0 or self.c[-1] != 1.0:
            raise ValueError(
                f"{self.name}: c must have {s} entries with c[0] = 0 and c[-1] = 1 (stiffly "
                f"accurate: the last stage is at t + dt), got {self.c!r}."
            )
        for i, row in enumerate(self.a):
            if abs(math.fsum(row) - self.c[i]) > _CONSISTENCY_TOL:
                raise ValueError(
                    f"{self.name}: row {i} of a sums to {math.fsum(row)!r}, but c[{i}] = "
                    f"{self.c[i]!r}; sum_j a_ij = c_i must hold (the diagonal included)."
                )
        if len(self.b_err) != s or abs(math.fsum(self.b_err)) > _CONSISTENCY_TOL:
            raise ValueError(
                f"{self.name}: b_err must have {s} entries summing to 0 (b - b_hat); got "
                f"{len(self.b_err)} summing to {math.fsum(self.b_err)!r}."
            )
        for name, value in (("order", self.order), ("error_order", self.error_order)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {name} must be an int >= 1, got {value!r}.")

    @property
    def n_stages(self) -> int:
        return len(self.a)

    @property
    def gamma(self) -> float:
        return self.a[1][1]

    @property
    def b(self) -> tuple[float, ...]:
        return self.a[-1]

    # What dense output and odeint read from any tableau: no continuous extension of its
    # own (cubic Hermite from y, k_1, y_new, k_s), an embedded pair, k_s = f(t + dt, y_new).
    dense = None
    dense_stages = ()
    adaptive = True
    fsal = True


def _kvaerno3() -> ESDIRKTableau:
    # gamma: the root in (1/6, 1/2) of 6 g^3 - 18 g^2 + 9 g - 1 = 0 (L-stability, order 3)
    g = 0.43586652150845899942
    a31 = (-4 * g**2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g**2 + 6 * g - 1) / (6 * g - 3)
    # the embedded 2nd-order solution is stage 3 (also at c = 1)
    return ESDIRKTableau(
        name="Kvaerno3",
        c=(0.0, 2 * g, 1.0, 1.0),
        a=((0.0,), (g, g), (a31, a32, g), (a41, a42, a43, g)),
        b_err=(a41 - a31, a42 - a32, a43 - g, g),
        order=3,
        error_order=2,
    )


def _kvaerno5() -> ESDIRKTableau:
    g = 0.26
    row6 = (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141,
            0.61943039072480676, g)
    row7 = (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046,
            0.62993304899016403, 0.06962479448202728, g)
    a = (
        (0.0,),
        (g, g),
        (0.13, 0.84033320996790809, g),
        (0.22371961478320505, 0.47675532319799699, -0.06470895363112615, g),
        (0.16648564323248321, 0.10450018841591720, 0.03631482272098715,
         -0.13090704451073998, g),
        row6,
        row7,
    )
    # the embedded 4th-order solution is stage 6 (also at c = 1)
    b_err = tuple(x - y for x, y in zip(row7, row6 + (0.0,)))
    c = (0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0)
    return ESDIRKTableau(name="Kvaerno5", c=c, a=a, b_err=b_err, order=5, error_order=4)


# Kværnø (2004): 3(2), 4 stages, and 5(4), 7 stages; both L-stable and stiffly accurate.
KVAERNO3 = _kvaerno3()
KVAERNO5 = _kvaerno5()
