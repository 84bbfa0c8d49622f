"""The forward's accepted steps as checkpoints, and the replay of one step with a graph.

The checkpointed adjoint (`Adjoint(checkpoints=True)`, see `_adjoint_checkpoint`) never
integrates y backwards in time. The forward odeint keeps, per accepted step and per sample,
the step's start (t, y), its size and end time, and where a terminal event or t_eval points
fell inside it: O(accepted steps x state) memory and no graph. The backward walks the steps
from the last to the first and, for the samples that took step k, replays that one step from
its checkpoint with autograd recording (the same method, size and stage solves as the
forward), then pulls the costate a back through it by one vector-Jacobian product:

    a_k = a_{k+1} d y_{k+1} / d y_k,        g_theta += a_{k+1} d y_{k+1} / d theta.

This is the discrete adjoint of the steps taken (the gradient Backprop gives, with one step's
graph alive at a time instead of all of them). For an implicit (ESDIRK) step the pull-back of
each stage applies the transposed iteration matrix (I - dt gamma J)^-T (see `_implicit`): the
costate recursion is as stable backwards as the forward steps were forwards, whatever the
stiffness, and the parameter sensitivities are a plain sum over the steps (quadrature) that
never enters a linear solve.

Reference: Griewank & Walther, *Evaluating Derivatives* (2nd ed., SIAM 2008), ch. 12
(checkpointing); Hager, "Runge–Kutta methods in optimal control and the transformed adjoint
system", Numer. Math. 87 (2000) (the discrete adjoint of a Runge–Kutta step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._events import state_at
from ._implicit import ImplicitRK, esdirk_stages
from ._interp import dense_stages, dense_value
from ._rk import _batch_view, rk_stages, time_like

__all__ = ["StepRecord", "record_step", "replay_step"]


@dataclass
class StepRecord:
    """One forward iteration's accepted rows (global sample ids `sample`, (rows,) int64).

    t, t_new, dt: (rows,) float64 start, end and signed size of the step; y: (rows, ...) the
    start state (detached). stop, theta: (rows,) bool / float64, the rows whose terminal event
    lies in the step and its position in [0, 1] (None when no row stopped). eval_from,
    eval_to: (rows,) int64, the t_eval points [eval_from, eval_to) filled by the step's dense
    output (None without t_eval)."""

    sample: torch.Tensor
    t: torch.Tensor
    t_new: torch.Tensor
    dt: torch.Tensor
    y: torch.Tensor
    stop: torch.Tensor | None
    theta: torch.Tensor | None
    eval_from: torch.Tensor | None
    eval_to: torch.Tensor | None


def record_step(tape, accept, idx, t, t_new, dt, y, stop, theta, eval_before, eval_after):
    """Append the accepted rows of one forward iteration to `tape` (nothing when none)."""
    with torch.no_grad():
        rows = accept.nonzero().flatten()
        if rows.numel() == 0:
            return

        def pick(x):
            return None if x is None else x.index_select(0, rows)

        stop_rows = pick(stop)
        if stop_rows is not None and not bool(stop_rows.any()):
            stop_rows = None
        tape.append(StepRecord(
            sample=idx.index_select(0, rows), t=pick(t), t_new=pick(t_new), dt=pick(dt),
            y=y.detach().index_select(0, rows), stop=stop_rows,
            theta=None if stop_rows is None else pick(theta),
            eval_from=pick(eval_before), eval_to=pick(eval_after),
        ))


def replay_step(record, field, solver, rtol, atol, event, grid, y, a, grad_event_t,
                grad_out):
    """The record's step recomputed from y (which requires grad), with its outputs and the
    incoming gradients to pull back.

    Arguments:
        record: the StepRecord; field: the checked f on the record's rows (args sliced).
        solver, rtol, atol: the forward's; event: its Event or None; grid: (batch, n) t_eval
            times or None.
        y: (rows, ...) the checkpoint, requiring grad.
        a: (rows, ...) dL/d(state at the step's end: the event state for stopped rows).
        grad_event_t: (rows,) dL/d(event time) or None; grad_out: (n, batch, ...) the
            gradient of the t_eval values, or None.

    Returns:
        (outputs, grads, converged): lists of tensors for one autograd.grad, and (rows,) bool
        whether every implicit stage solve converged again (True for explicit methods).
    """
    tab = solver.tableau
    t, t_new, dt = record.t, record.t_new, record.dt
    k1 = field(time_like(t, y), y)
    converged = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    if isinstance(solver, ImplicitRK):
        y_new, _, stages, _, converged, *_ = esdirk_stages(field, t, y, dt, solver, k1, rtol,
                                                           atol)
    else:
        y_new, _, stages, _ = rk_stages(field, t, y, dt, tab, k1)
    dense = record.stop is not None or record.eval_from is not None
    k_next = None
    if dense:
        k_next = stages[-1] if tab.fsal else field(time_like(t_new, y_new), y_new)
        need = torch.zeros_like(converged)
        if record.stop is not None:
            need = need | record.stop
        if record.eval_from is not None:
            need = need | (record.eval_to > record.eval_from)
        stages, _ = dense_stages(field, tab, t, dt, y, stages, need)
    y_end, t_end = y_new, t_new
    outputs, grads = [], []
    if record.stop is not None:
        t_event = t + record.theta * dt
        y_hit, t_hit, _ = state_at(event, field, tab, record.theta, t_event, dt, y, y_new,
                                   stages, k_next)
        y_end = torch.where(_batch_view(record.stop, y), y_hit, y_new)
        t_end = torch.where(record.stop, t_event, t_new)
        if grad_event_t is not None:
            outputs.append(t_hit)
            grads.append(torch.where(record.stop, grad_event_t, torch.zeros_like(grad_event_t)))
    outputs.append(y_end)
    grads.append(a)
    if record.eval_from is not None and grad_out is not None:
        first, last = int(record.eval_from.min()), int(record.eval_to.max())
        safe_dt = torch.where(dt == 0, torch.ones_like(dt), dt)
        for j in range(first, last):
            inside = (record.eval_from <= j) & (j < record.eval_to)
            if not bool(inside.any()):
                continue
            t_point = grid[record.sample, j]
            theta = ((t_point - t) / safe_dt).clamp(0.0, 1.0)
            value = dense_value(tab, theta, dt, y, y_new, stages, k_next)
            value = torch.where(_batch_view(t_point == t_end, y), y_end, value)
            incoming = grad_out[j].index_select(0, record.sample)
            outputs.append(value)
            grads.append(torch.where(_batch_view(inside, y), incoming,
                                     torch.zeros_like(incoming)))
    return outputs, grads, converged
