"""The checkpointed adjoint: gradients from the forward's accepted steps, never integrating y
backwards in time (`Adjoint(checkpoints=True)`, the default for implicit solvers, events and
per-sample t_eval).

The continuous adjoint re-integrates y from t1 back to t0 together with the costate. For a
stiff field that backward integration of y is unstable (the decaying modes grow backwards)
and the backward solve fails. Here the forward keeps its accepted steps as checkpoints (see
`_tape`) and the backward replays them one at a time, pulling the costate back through each
step: the backward costs about one forward step plus one vector-Jacobian product per
accepted step, keeps one step's graph alive at a time, and holds O(steps x state) memory of
checkpoints. Each sample's costate is pulled back through its own steps only, so its
gradient does not depend on its batch-mates, and each sample starts its backward where it
stopped: at t1, at its own terminal event, or at its last accepted step.

Terminal events (Chen, Amos & Nickel, ICLR 2021): the event time t* solves g(t*, y(t*)) = 0,
so dt*/dtheta = -(dg/dy . dy(t*)/dtheta + dg/dtheta) / (dg/dt + dg/dy . f(t*, y*)); the
replayed event step attaches exactly this derivative (`_events.state_at`), so the gradient
of the event time and of the state at the event reach y0, f's and g's parameters and args.
"""

from __future__ import annotations

import torch

from .._autocast import autocast_context, autocast_dtype
from .._solution import Status
from ._adjoint_time import time_span_gradient
from ._inputs import _api, _Field
from ._integrate import odeint
from ._tape import replay_step

__all__ = ["CheckpointFunction"]


class _Counted:
    """f with a count of its (batched) calls: the backward's evaluations of f."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, *args):
        self.calls += 1
        return self.f(*args)


class CheckpointFunction(torch.autograd.Function):
    """value, event_t, event_y = apply(config, y0, t_pair, *params, *args).

    config: (f, t_span, t_grid, solver, rtol, atol, max_steps, dt0, event, stats_out,
    n_params). event_t (batch,) / event_y (batch, ...) are empty without a terminal event."""

    @staticmethod
    def forward(ctx, config, y0, t_pair, *inputs):
        f, t_span, t_grid, solver, rtol, atol, max_steps, dt0, event, stats_out, n_params = (
            config
        )
        args = inputs[n_params:]
        tape: list = []
        with torch.no_grad(), _api("odeint_adjoint"):
            sol = odeint(f, y0, t_span, solver=solver, rtol=rtol, atol=atol, t_eval=t_grid,
                         max_steps=max_steps, dt0=dt0, args=args, event=event, _tape=tape)
        stats_out.update(sol.stats)
        stats_out["status"] = sol.status
        stats_out["adjoint_checkpoints"] = sum(int(r.sample.numel()) for r in tape)
        terminal = event is not None and event.terminal
        event_t = sol.stats.pop("event_t") if terminal else y0.new_empty(0)
        event_y = sol.stats.pop("event_y") if terminal else y0.new_empty(0)
        stats_out.pop("event_t", None)
        stats_out.pop("event_y", None)
        ctx.autocast = (y0.device.type, autocast_dtype(y0.device.type))
        ctx.config, ctx.tape, ctx.t_pair = config, tape, t_pair is not None
        ctx.end_t = sol.stats["t"]
        ctx.save_for_backward(sol.value, y0, event_t, *inputs)
        if not terminal:
            ctx.mark_non_differentiable(event_t, event_y)
        return sol.value, event_t, event_y

    @staticmethod
    def backward(ctx, grad_value, grad_event_t, grad_event_y):
        with autocast_context(*ctx.autocast):
            return _backward(ctx, grad_value, grad_event_t, grad_event_y)


def _backward(ctx, grad_value, grad_event_t, grad_event_y):
    f, t_span, t_grid, solver, rtol, atol, max_steps, dt0, event, stats_out, n_params = (
        ctx.config
    )
    value, y0, event_t, *inputs = ctx.saved_tensors
    params = tuple(inputs[:n_params])
    wants = ctx.needs_input_grad[3 + n_params:]
    args = tuple(x.detach() for x in inputs[n_params:])
    batch, device = y0.shape[0], y0.device
    t0, t1 = (float(t) for t in t_span)
    has_event = event_t.numel() > 0
    grid = None
    if t_grid is not None:
        grid = t_grid.to(device).expand(batch, t_grid.shape[-1])
        if grad_value is None:
            grad_value = torch.zeros_like(value)
    # a = dL/d(each sample's final state): its final value, the t_eval points after it
    # stopped (they hold its final state), and the state at its event
    if grid is None:
        a = torch.zeros_like(y0) if grad_value is None else grad_value.clone()
    else:
        reached = (grid[:, 0] == t0).long()
        for record in ctx.tape:
            reached = reached.index_copy(0, record.sample, record.eval_to)
        later = torch.arange(grid.shape[1], device=device)[:, None] >= reached[None, :]
        later = later.reshape(later.shape + (1,) * (y0.dim() - 1))
        a = torch.where(later, grad_value, torch.zeros_like(grad_value)).sum(dim=0)
    if has_event and grad_event_y is not None:
        hit = torch.isfinite(event_t).reshape((-1,) + (1,) * (y0.dim() - 1))
        a = a + torch.where(hit, grad_event_y, torch.zeros_like(grad_event_y))
    if has_event and grad_event_t is not None:
        grad_event_t = torch.where(torch.isfinite(event_t), grad_event_t,
                                   torch.zeros_like(grad_event_t))
    else:
        grad_event_t = None
    grad_params = [torch.zeros_like(p) for p in params]
    grad_args = [torch.zeros_like(x) if w else None for x, w in zip(args, wants)]
    counted = _Counted(f)
    status = int(Status.SUCCESS)
    for record in reversed(ctx.tape):
        rows = record.sample
        with torch.enable_grad():
            y = record.y.detach().requires_grad_(True)
            arg_rows = tuple(x.index_select(0, rows).requires_grad_(w)
                             for x, w in zip(args, wants))
            field = _Field(counted, arg_rows, rows.numel(), "odeint_adjoint")
            outputs, incoming, converged = replay_step(
                record, field, solver, rtol, atol, event, grid, y, a.index_select(0, rows),
                None if grad_event_t is None else grad_event_t.index_select(0, rows),
                grad_value if grid is not None else None,
            )
            wrt = [y, *params, *(x for x in arg_rows if x.requires_grad)]
            grads = torch.autograd.grad(outputs, wrt, incoming, allow_unused=True)
        if status == int(Status.SUCCESS) and not bool(converged.all()):
            status = int(Status.NEWTON_FAILED)
        a = a.index_copy(0, rows, torch.zeros_like(y) if grads[0] is None else grads[0])
        for i, g in enumerate(grads[1 : 1 + n_params]):
            if g is not None:
                grad_params[i] = grad_params[i] + g
        wanted = iter(grads[1 + n_params:])
        for i, w in enumerate(wants):
            if w:
                g = next(wanted)
                if g is not None:
                    grad_args[i] = grad_args[i].index_add(0, rows, g)
    if grid is not None:
        # a t_eval point at t0 holds y0 itself
        at_start = (grid[:, 0] == t0).reshape((-1,) + (1,) * (y0.dim() - 1))
        a = a + torch.where(at_start, grad_value[0], torch.zeros_like(a))
    grad_t = None
    if ctx.t_pair and ctx.needs_input_grad[2]:
        # only the samples that ran to t1 move with it (not those stopped by an event)
        at_t1 = (ctx.end_t.to(device) == t1).reshape((-1,) + (1,) * (y0.dim() - 1))
        final = value if grid is None else value[-1]
        g_end = (None if grid is not None or grad_value is None
                 else torch.where(at_t1, grad_value, torch.zeros_like(grad_value)))
        grad_t, extra = time_span_gradient(counted, final, y0, g_end, a, t0, t1,
                                           g_end is None, args)
    stats_out["adjoint_nfe"] = counted.calls
    stats_out["adjoint_status"] = status
    return (None, a, grad_t, *grad_params, *grad_args)
