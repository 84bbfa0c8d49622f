"""Dense output: the solution inside an accepted step, for `t_eval`.

Tableaus with their own continuous extension (Dopri5: Shampine's, Tsit5: Tsitouras') use it:

    y(t + theta dt) = y + dt sum_i b_i(theta) k_i      (4th order, no extra evaluations).

Every other method uses cubic Hermite interpolation between (y, f(t, y)) and
(y_new, f(t + dt, y_new)) (4th-order accurate locally, 3rd globally, no extra evaluations
because odeint always keeps f at the current state for the next step).

Reference: Hairer, Nørsett, Wanner, *Solving ODEs I*, II.6 (dense output).
"""

from __future__ import annotations

import torch

from ._tableau import ButcherTableau

__all__ = ["dense_value"]


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
        stages: the s stage derivatives k_i of the step (k_1 = f(t, y)).
        f_new: (batch, ...) f(t + dt, y_new).

    Returns:
        (batch, ...) the interpolated state.
    """
    shape = (-1,) + (1,) * (y.dim() - 1)
    theta = theta.to(y.dtype)
    dt = dt.to(y.dtype)
    if tableau.dense is not None:
        dense = tableau.tensors(y.dtype, y.device)["dense"]  # (s, p)
        powers = theta[:, None] ** torch.arange(
            1, dense.shape[1] + 1, device=y.device, dtype=y.dtype
        )
        weights = powers @ dense.T  # (batch, s)
        incr = sum(weights[:, i].reshape(shape) * k for i, k in enumerate(stages))
        return y + dt.reshape(shape) * incr
    th = theta.reshape(shape)
    th2, th3 = th * th, th * th * th
    h00 = 2 * th3 - 3 * th2 + 1
    h10 = th3 - 2 * th2 + th
    h01 = -2 * th3 + 3 * th2
    h11 = th3 - th2
    dt_b = dt.reshape(shape)
    return h00 * y + h10 * dt_b * stages[0] + h01 * y_new + h11 * dt_b * f_new
