"""Dense output: the solution inside an accepted step, for `t_eval` and events.

Tableaus with their own continuous extension (Dopri5: Shampine's, Tsit5: Tsitouras', both
4th order; Dopri8: 7th order) use it:

    y(t + theta dt) = y + dt sum_i b_i(theta) k_i.

Dopri5's and Tsit5's need no extra evaluations. Dopri8's runs over its 14 stages and five
extra ones (``ButcherTableau.dense_stages``), which `dense_stages` evaluates only for the rows
of a step that need a value inside it, so a solve without t_eval or events costs nothing
more. Every other method uses cubic Hermite interpolation between (y, f(t, y)) and
(y_new, f(t + dt, y_new)) (4th-order accurate locally, 3rd globally, no extra evaluations
because odeint always keeps f at the current state for the next step).

Reference: Hairer, Nørsett, Wanner, *Solving ODEs I*, II.6 (dense output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._rk import _batch_view, _weighted_sum, time_like
from ._tableau import ButcherTableau

__all__ = ["dense_stages", "dense_value"]


def dense_stages(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tableau: ButcherTableau,
    t: torch.Tensor,
    dt: torch.Tensor,
    y: torch.Tensor,
    stages: list[torch.Tensor],
    need: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The step's stages with the tableau's extra dense-output stages appended.

    The extra stages are evaluated only on the rows in `need` (f is row-wise; the other rows
    get zeros, which no value they report uses). Returns `stages` unchanged when the tableau
    has no extra stages, they are already appended, or no row needs them.

    Arguments:
        f: the checked vector field on the step's rows (odeint's `_Field`: `on_rows` gives
            it on a subset, with its args sliced).
        tableau: the method's tableau; t, dt: (rows,) float64 start and signed size; y:
            (rows, ...) start state; stages: the step's stage derivatives; need: (rows,) bool.

    Returns:
        (stages, nfe): the extended list and (rows,) int64 evaluations of f made per row.
    """
    n_extra = len(tableau.dense_stages)
    nfe = need.long() * n_extra
    if n_extra == 0 or len(stages) > tableau.n_stages or not bool(need.any()):
        return stages, torch.zeros_like(nfe)
    rows = None if bool(need.all()) else need.nonzero().flatten()

    def pick(x):
        return x if rows is None else x.index_select(0, rows)

    if rows is not None:
        f = f.on_rows(rows)
    y_rows, t_rows, dt_rows = pick(y), pick(t), pick(dt)
    ks = [pick(k) for k in stages]
    dt_b = _batch_view(dt_rows.to(y.dtype), y_rows)
    for row in tableau.dense_stages:
        state = torch.addcmul(y_rows, dt_b, _weighted_sum(ks, row))
        ks.append(f(time_like(t_rows + sum(row) * dt_rows, y_rows), state))
    extra = ks[len(stages):]
    if rows is not None:
        extra = [torch.zeros_like(y).index_copy(0, rows, k) for k in extra]
    return list(stages) + extra, nfe


def dense_value(
    tableau: ButcherTableau,
    theta: torch.Tensor,
    dt: torch.Tensor,
    y: torch.Tensor,
    y_new: torch.Tensor,
    stages: list[torch.Tensor],
    f_new: torch.Tensor,
) -> torch.Tensor:
    """y at t + theta dt inside one step, per sample.

    Arguments:
        tableau: the method's tableau.
        theta: (batch,) position in the step, in [0, 1].
        dt: (batch,) signed step size.
        y, y_new: (batch, ...) state at the step's start and end.
        stages: the s stage derivatives k_i of the step (k_1 = f(t, y)), followed by the
            extra dense stages when the tableau has them (see `dense_stages`).
        f_new: (batch, ...) f(t + dt, y_new).

    Returns:
        (batch, ...) the interpolated state.

    Raises:
        RuntimeError: the tableau has extra dense stages and `stages` lacks them.
    """
    shape = (-1,) + (1,) * (y.dim() - 1)
    dt = dt.to(y.dtype)
    if tableau.dense is not None:
        if len(stages) != len(tableau.dense):
            raise RuntimeError(
                f"{tableau.name}'s dense output needs {len(tableau.dense)} stages, got "
                f"{len(stages)}: extend them with dense_stages(...) first."
            )
        # The weights b_i(theta) in float64, then cast: their power-basis coefficients reach
        # |768| (Dopri8), whose cancellation near theta = 1 would cost float32 digits.
        dense = tableau.tensors(torch.float64, y.device)["dense"]  # (s, p)
        theta64 = theta.to(torch.float64)
        powers = theta64[:, None] ** torch.arange(
            1, dense.shape[1] + 1, device=y.device, dtype=torch.float64
        )
        weights = (powers @ dense.T).to(y.dtype)  # (batch, s)
        incr = sum(weights[:, i].reshape(shape) * k for i, k in enumerate(stages))
        return y + dt.reshape(shape) * incr
    th = theta.to(y.dtype).reshape(shape)
    th2, th3 = th * th, th * th * th
    h00 = 2 * th3 - 3 * th2 + 1
    h10 = th3 - 2 * th2 + th
    h01 = -2 * th3 + 3 * th2
    h11 = th3 - th2
    dt_b = dt.reshape(shape)
    return h00 * y + h10 * dt_b * stages[0] + h01 * y_new + h11 * dt_b * f_new
