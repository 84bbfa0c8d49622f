"""Butcher tableaus of explicit Runge–Kutta methods, as checked data.

A tableau (c, A, b) defines the s-stage explicit method

    k_i = f(t + c_i dt, y + dt sum_{j<i} a_ij k_j),    y_new = y + dt sum_i b_i k_i,

and an embedded pair adds error weights ``b_err = b - b_hat`` so that the local error estimate
is ``dt sum_i b_err_i k_i`` (the difference between the main solution and the embedded one).
Optional dense-output weights give a continuous extension of the step,

    y(t + theta dt) = y + dt sum_i b_i(theta) k_i,    b_i(theta) = sum_p dense[i][p] theta^(p+1).

Every tableau is checked in float64 when it is built (sum_j a_ij = c_i, sum b = 1,
sum b_err = 0, A strictly lower triangular, FSAL structure, dense(1) = b) so that a typo in a
coefficient fails at import, not as a silently wrong order.

References:
    Hairer, Nørsett, Wanner, *Solving Ordinary Differential Equations I* (2nd ed., 1993), II.1
    and II.5 (Dormand–Prince 5(4) and Shampine's dense output); Bogacki & Shampine, "A 3(2) pair
    of Runge–Kutta formulas", Appl. Math. Lett. 2 (1989); Tsitouras, "Runge–Kutta pairs of
    order 5(4) satisfying only the first column simplifying assumption", Comput. Math. Appl. 62
    (2011).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ._dopri8_dense import DENSE as DOPRI8_DENSE
from ._dopri8_dense import EXTRA_ROWS as DOPRI8_EXTRA_ROWS

__all__ = [
    "BOSH3",
    "DOPRI8",
    "DOPRI5",
    "EULER",
    "HEUN",
    "MIDPOINT",
    "RK4",
    "TSIT5",
    "ButcherTableau",
]

# Coefficients of published tableaus are given to ~16-17 digits (Tsit5 in decimals), so the
# consistency sums hold to rounding only; 1e-12 catches any typo while accepting rounding.
_CONSISTENCY_TOL = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta tableau, checked at construction.

    Arguments:
        name: a human name ("Tsit5").
        c: nodes, length s, with c[0] = 0.
        a: the strictly lower-triangular matrix as rows; row i has length i (row 0 is empty).
        b: weights of the main solution, length s, summing to 1.
        order: order of the main solution (what the fitted convergence order should be).
        b_err: ``b - b_hat`` (main minus embedded weights), length s, summing to 0; ``None``
            for fixed-step methods.
        error_order: order of the embedded solution (the error estimate is O(dt^(q+1)) with
            q = error_order); required when ``b_err`` is given.
        fsal: first-same-as-last: the last stage is evaluated at (t + dt, y_new), so it is
            the next step's first stage. Checked: c[-1] = 1, a[-1] = b, b[-1] = 0.
        dense: optional dense-output weights; ``dense[i][p]`` multiplies theta^(p+1) in
            b_i(theta), one row per stage (and per extra stage). Checked: b_i(1) = b_i (0
            for an extra stage).
        dense_stages: optional extra stages that only the dense output uses (evaluated only
            on steps that need a value inside them): row j is the row of a of stage s + j
            over the s + j stages before it, its node the row's sum.

    Raises:
        ValueError: when a shape or a consistency condition fails, naming it.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    b_err: tuple[float, ...] | None = None
    error_order: int | None = None
    fsal: bool = False
    dense: tuple[tuple[float, ...], ...] | None = None
    dense_stages: tuple[tuple[float, ...], ...] = ()
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        if s < 1:
            raise ValueError(f"{self.name}: a tableau needs at least one stage (c is empty).")
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(
                f"{self.name}: a must be strictly lower triangular: {s} rows, row i of "
                f"length i; got row lengths {[len(row) for row in self.a]}."
            )
        if len(self.b) != s:
            raise ValueError(f"{self.name}: b has length {len(self.b)}, expected {s} (= len(c)).")
        if self.c[0] != 0:
            raise ValueError(f"{self.name}: c[0] must be 0 for an explicit method.")
        for i, row in enumerate(self.a):
            if abs(math.fsum(row) - self.c[i]) > _CONSISTENCY_TOL:
                raise ValueError(
                    f"{self.name}: row {i} of a sums to {math.fsum(row)!r}, but c[{i}] = "
                    f"{self.c[i]!r}; sum_j a_ij = c_i must hold."
                )
        if abs(math.fsum(self.b) - 1.0) > _CONSISTENCY_TOL:
            raise ValueError(f"{self.name}: b sums to {math.fsum(self.b)!r}; it must sum to 1.")
        if not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"{self.name}: order must be an int >= 1, got {self.order!r}.")
        if self.b_err is not None:
            if len(self.b_err) != s:
                raise ValueError(f"{self.name}: b_err has length {len(self.b_err)}, expected {s}.")
            if abs(math.fsum(self.b_err)) > _CONSISTENCY_TOL:
                raise ValueError(
                    f"{self.name}: b_err sums to {math.fsum(self.b_err)!r}; the error weights "
                    "b - b_hat must sum to 0."
                )
            if not isinstance(self.error_order, int) or self.error_order < 1:
                raise ValueError(
                    f"{self.name}: an embedded pair needs error_order (an int >= 1), got "
                    f"{self.error_order!r}."
                )
        elif self.error_order is not None:
            raise ValueError(f"{self.name}: error_order given without b_err.")
        if self.fsal:
            last = self.a[-1]
            if (
                self.c[-1] != 1
                or self.b[-1] != 0
                or any(abs(x - y) > _CONSISTENCY_TOL for x, y in zip(last, self.b[:-1]))
            ):
                raise ValueError(
                    f"{self.name}: fsal=True needs c[-1] = 1, b[-1] = 0 and a[-1] = b[:-1]."
                )
        if any(len(row) != s + j for j, row in enumerate(self.dense_stages)):
            raise ValueError(
                f"{self.name}: dense_stages row j must have {s} + j entries (one per earlier "
                f"stage); got {[len(row) for row in self.dense_stages]}."
            )
        if self.dense_stages and self.dense is None:
            raise ValueError(f"{self.name}: dense_stages given without dense weights.")
        if self.dense is not None:
            total = s + len(self.dense_stages)
            if len(self.dense) != total or len({len(row) for row in self.dense}) != 1:
                raise ValueError(
                    f"{self.name}: dense must have {total} rows of equal length (one per "
                    "stage and extra dense stage)."
                )
            b_all = tuple(self.b) + (0.0,) * len(self.dense_stages)
            for i, row in enumerate(self.dense):
                if abs(math.fsum(row) - b_all[i]) > 1e-10:
                    raise ValueError(
                        f"{self.name}: dense row {i} at theta = 1 gives {math.fsum(row)!r}, "
                        f"but b[{i}] = {b_all[i]!r}; the interpolant must end at y_new."
                    )

    @property
    def n_stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """True when the tableau has an embedded error estimate."""
        return self.b_err is not None

    def tensors(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The coefficients as tensors of `dtype` on `device`, cached per (dtype, device).

        Returns a dict with ``a`` (s, s) (zero above the diagonal), ``b`` (s,), ``c`` (s,),
        ``b_err`` (s,) when adaptive, ``dense`` (s + extra stages, p) when there is dense
        output.
        """
        key = (dtype, torch.device(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        s = self.n_stages
        a = np.zeros((s, s))
        for i, row in enumerate(self.a):
            a[i, :i] = row
        out = {
            "a": torch.tensor(a, dtype=dtype, device=device),
            "b": torch.tensor(self.b, dtype=dtype, device=device),
            "c": torch.tensor(self.c, dtype=dtype, device=device),
        }
        if self.b_err is not None:
            out["b_err"] = torch.tensor(self.b_err, dtype=dtype, device=device)
        if self.dense is not None:
            out["dense"] = torch.tensor(self.dense, dtype=dtype, device=device)
        self._cache[key] = out
        return out

    def stage_columns(self, dtype: torch.dtype, device: torch.device, ndim: int
                      ) -> list[torch.Tensor | None]:
        """Per stage j, the weights of k_j in every weighted sum of stages still open when
        k_j is known, as an (open sums, 1, ..., 1) tensor for states of `ndim` dimensions
        (None when they are all zero); cached per (dtype, device, ndim).

        The open sums, in order: the increments sum_{l<i} a_il k_l of the stages i > j, then
        sum_l b_l k_l (unless FSAL, whose last stage is y_new) and sum_l b_err_l k_l."""
        key = ("columns", dtype, torch.device(device), ndim)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        sums = list(self.a[1:]) + ([] if self.fsal else [self.b])
        sums += [] if self.b_err is None else [self.b_err]
        columns: list[torch.Tensor | None] = []
        for j in range(self.n_stages):
            # once k_j is in, stage j + 1's increment (row j) is complete: rows j... are open
            weights = [row[j] for row in sums[j:]]
            columns.append(None if not any(weights) else torch.tensor(
                weights, dtype=dtype, device=device).reshape((-1,) + (1,) * ndim))
        self._cache[key] = columns
        return columns


EULER = ButcherTableau(name="Euler", c=(0.0,), a=((),), b=(1.0,), order=1)

MIDPOINT = ButcherTableau(
    name="Midpoint", c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2
)

# Heun's method (explicit trapezoidal rule).
HEUN = ButcherTableau(name="Heun", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2)

RK4 = ButcherTableau(
    name="RK4",
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    order=4,
)

# Bogacki–Shampine 3(2), FSAL. b_hat = (7/24, 1/4, 1/3, 1/8).
BOSH3 = ButcherTableau(
    name="Bosh3",
    c=(0.0, 0.5, 0.75, 1.0),
    a=((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_err=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    order=3,
    error_order=2,
    fsal=True,
)

# Dormand–Prince 5(4), FSAL, with Shampine's (1986) fourth-order dense output
# (Hairer–Nørsett–Wanner I, II.6), rows = stages, columns = theta^1..theta^4.
_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_HAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5 = ButcherTableau(
    name="Dopri5",
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DOPRI5_B[:6],
    ),
    b=_DOPRI5_B,
    b_err=tuple(x - y for x, y in zip(_DOPRI5_B, _DOPRI5_B_HAT)),
    order=5,
    error_order=4,
    fsal=True,
    dense=(
        (1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933,
         87487479700 / 32700410799),
        (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
        (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408,
         701980252875 / 199316789632),
        (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
        (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423),
    ),
)


def _tsit5_dense() -> tuple[tuple[float, ...], ...]:
    """Tsitouras' (2011) interpolant, given as factored polynomials, in monomial form."""
    P = np.polynomial.polynomial
    theta = (0.0, 1.0)
    factored = [
        -1.0530884977290216 * P.polymul(
            P.polymul(theta, (-1.3299890189751412, 1.0)),
            (0.7139816917074209, -1.4364028541716351, 1.0),
        ),
        0.1017 * P.polymul((0.0, 0.0, 1.0), (1.2949852507374631, -2.1966568338249754, 1.0)),
        2.490627285651252793
        * P.polymul((0.0, 0.0, 1.0), (1.57803468208092486, -2.38535645472061657, 1.0)),
        -16.54810288924490272 * P.polymul(
            (0.0, 0.0, 1.0), P.polymul((-1.21712927295533244, 1.0), (-0.61620406037800089, 1.0))
        ),
        47.37952196281928122 * P.polymul(
            (0.0, 0.0, 1.0),
            P.polymul((-1.203071208372362603, 1.0), (-0.658047292653547382, 1.0)),
        ),
        -34.87065786149660974
        * P.polymul((0.0, 0.0, 1.0), P.polymul((-1.2, 1.0), (-0.666666666666666667, 1.0))),
        2.5 * P.polymul((0.0, 0.0, 1.0), P.polymul((-1.0, 1.0), (-0.6, 1.0))),
    ]
    rows = []
    for poly in factored:
        coeffs = np.zeros(5)
        coeffs[: len(poly)] = poly
        rows.append(tuple(float(x) for x in coeffs[1:]))  # theta^1..theta^4; constant is 0
    return tuple(rows)


_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
)
TSIT5 = ButcherTableau(
    name="Tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
        ),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    # b - b_hat as published by Tsitouras (2011), Table 1 ("b_hat_i - b_i" with sign flipped).
    b_err=(
        -0.00178001105222577714,
        -0.0008164344596567469,
        0.007880878010261995,
        -0.1447110071732629,
        0.5823571654525552,
        -0.45808210592918697,
        1 / 66,
    ),
    order=5,
    error_order=4,
    fsal=True,
    dense=_tsit5_dense(),
)


def _dopri8() -> ButcherTableau:
    """Prince & Dormand's RK8(7)13M with its 13-stage rational coefficients, written with a
    14th, FSAL stage at (t + dt, y_new) (the next step's first: no extra cost), whose
    derivative the dense output also uses, with five more stages for its 7th-order dense
    output."""
    a = (
        (),
        (1 / 18,),
        (1 / 48, 1 / 16),
        (1 / 32, 0.0, 3 / 32),
        (5 / 16, 0.0, -75 / 64, 75 / 64),
        (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
        (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000,
         23124283 / 1800000000),
        (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777,
         545815736 / 2771057229, -180193667 / 1043307555),
        (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301,
         100302831 / 723423059, 790204164 / 839813087, 800635310 / 3783071287),
        (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246,
         -309121744 / 1061227803, -12992083 / 490766935, 6005943493 / 2108947869,
         393006217 / 1396673457, 123872331 / 1001029789),
        (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823,
         -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
         -45442868181 / 3398467696, 3065993473 / 597172653),
        (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517,
         -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563,
         -4093664535 / 808688257, 3962137247 / 1805957418, 65686358 / 487910083),
        (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805,
         652783627 / 914296604, 11173962825 / 925320556, -13158990841 / 6184727034,
         3936647629 / 1978049680, -160528059 / 685178525, 248638103 / 1413531060, 0.0),
    )
    b = (14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825,
         181606767 / 758867731, 561292985 / 797845732, -1041891430 / 1371343529,
         760417239 / 1151165299, 118820643 / 751138087, -528747749 / 2220607170, 1 / 4)
    b_hat = (13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145,
             1757004468 / 5645159321, 656045339 / 265891186, -3867574721 / 1518517206,
             465885868 / 322736535, 53011238 / 667516719, 2 / 45, 0.0)
    c = (0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200,
         5490023248 / 9719169821, 13 / 20, 1201146811 / 1299019798, 1.0, 1.0, 1.0)
    return ButcherTableau(
        name="Dopri8",
        c=c,
        a=a + (b,),
        b=b + (0.0,),
        b_err=tuple(x - y for x, y in zip(b, b_hat)) + (0.0,),
        order=8,
        error_order=7,
        fsal=True,
        # 7th order, on 5 extra stages (see _dopri8_dense.py: derived by bootstrapping)
        dense=DOPRI8_DENSE,
        dense_stages=DOPRI8_EXTRA_ROWS,
    )


# Prince & Dormand, "High order embedded Runge-Kutta formulae", J. Comput. Appl. Math. 7
# (1981): 8(7), 13 stages + FSAL.
DOPRI8 = _dopri8()
