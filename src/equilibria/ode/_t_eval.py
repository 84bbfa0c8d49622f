"""odeint's output at t_eval: the buffer, its filling from each accepted step's dense output,
and the final values of samples that stopped before their last t_eval point.

Every sample has its own grid (a shared (n,) t_eval is expanded to (batch, n): one code
path) and its own position next_i, the first of its points not yet written. An accepted step
writes the points inside it, up to the step's end (or a terminal event inside it); the steps
themselves never depend on t_eval.
"""

from __future__ import annotations

import torch

from ._interp import dense_value

__all__ = ["fill_t_eval", "finish_t_eval", "points_inside", "start_t_eval"]


def start_t_eval(t_grid: torch.Tensor, y0: torch.Tensor, t0: float):
    """(out, grid, next_i): the (n, batch, ...) output with y0 written where a sample's first
    point is t0, the (batch, n) grid, and each sample's next point to fill, (batch,) int64."""
    batch = y0.shape[0]
    grid = t_grid.to(y0.device).expand(batch, t_grid.shape[-1])
    out = y0.new_zeros((grid.shape[1],) + tuple(y0.shape))
    at_start = grid[:, 0] == t0  # strictly monotone: only the first time can be t0
    out[0] = torch.where(at_start.reshape((-1,) + (1,) * (y0.dim() - 1)), y0, out[0])
    return out, grid, at_start.long()


def points_inside(grid, next_i, idx, accept, t_end, direction):
    """(rows,) bool: the accepted rows whose next t_eval point lies inside the step (up to
    t_end); and the (rows,) position of that point (clamped to the grid)."""
    n_eval = grid.shape[1]
    with torch.no_grad():
        pos = next_i.clamp_max(n_eval - 1)
        inside = accept & (next_i < n_eval) & ((grid[idx, pos] - t_end) * direction <= 0)
    return inside, pos


def fill_t_eval(out, grid, next_i, idx, accept, t, t_end, dt_step, direction, tab, y, y_new,
                stages, k_next, y_end):
    """Write the dense-output value at every t_eval point inside this accepted step, up to
    t_end (the step's end, or a terminal event inside it, where the state is y_end).

    Returns the rows' new next_i."""
    n_eval = grid.shape[1]
    extra = (1,) * (y.dim() - 1)
    for _ in range(n_eval):
        inside, pos = points_inside(grid, next_i, idx, accept, t_end, direction)
        if not bool(inside.any()):
            break
        with torch.no_grad():
            t_point = grid[idx, pos]
            safe_dt = torch.where(dt_step == 0, torch.ones_like(dt_step), dt_step)
            theta = ((t_point - t) / safe_dt).clamp(0.0, 1.0)
        if tab.dense is not None and len(stages) < len(tab.dense):
            # extra dense stages (Dopri8) are evaluated only for points strictly inside a
            # step: without them, every point here is at the step's end
            value = y_end
        else:
            value = dense_value(tab, theta, dt_step, y, y_new, stages, k_next)
            value = torch.where((t_point == t_end).reshape((-1,) + extra), y_end, value)
        current = out[pos, idx]
        out[pos, idx] = torch.where(inside.reshape((-1,) + extra), value, current)
        next_i = next_i + inside
    return next_i


def finish_t_eval(out: torch.Tensor, value: torch.Tensor, next_i: torch.Tensor) -> torch.Tensor:
    """The (n, batch, ...) result: samples that stopped early hold their final state `value`
    at the t_eval points they never reached (their status says why they stopped)."""
    n_eval = out.shape[0]
    unreached = torch.arange(n_eval, device=out.device)[:, None] >= next_i[None, :]
    return torch.where(unreached.reshape(unreached.shape + (1,) * (value.dim() - 1)),
                       value.unsqueeze(0), out)
