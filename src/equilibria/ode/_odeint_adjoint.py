"""odeint_adjoint: odeint differentiated by an adjoint backward (continuous or checkpointed).

This module checks the call, picks the backward (`Adjoint.checkpoints`; automatic: the
checkpointed one for implicit solvers, events and per-sample t_eval) and returns a Solution
whose value, and event time and state, carry the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._checks import check_batched_state
from .._solution import Solution
from ._adjoint import Adjoint, AdjointFunction
from ._adjoint_checkpoint import CheckpointFunction
from ._events import Event
from ._implicit import ImplicitRK
from ._inputs import check_args, check_event
from ._solvers import RungeKutta, Tsit5

__all__ = ["odeint_adjoint"]


def _use_checkpoints(gradient: Adjoint, solver, event, per_sample_grid: bool) -> bool:
    """Which backward runs; refuses combinations that would drop an option or a gradient."""
    needs = []
    if event is not None:
        needs.append("event=")
    if per_sample_grid:
        needs.append("a per-sample (batch, n) t_eval")
    if gradient.checkpoints is False and needs:
        raise ValueError(
            f"Adjoint(checkpoints=False) (the continuous backward) does not support "
            f"{' or '.join(needs)}: use Adjoint() or Adjoint(checkpoints=True), whose backward "
            "starts each sample where it stopped and follows its own times."
        )
    if gradient.checkpoints is not None:
        return gradient.checkpoints
    chosen = bool(needs) or isinstance(solver, ImplicitRK)
    if chosen and gradient.continuous_options():
        why = "an implicit solver" if not needs else needs[0]
        raise ValueError(
            f"with {why}, Adjoint() uses the checkpointed backward, which replays the forward's "
            f"steps and has no backward solve of its own, so "
            f"{', '.join(gradient.continuous_options())} would be ignored: drop them, or pass "
            "Adjoint(checkpoints=False, ...) for the continuous backward (explicit forward "
            "solvers, shared t_eval, no event; unstable on stiff problems)."
        )
    return chosen


def odeint_adjoint(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t_span: tuple[float, float] = (0.0, 1.0),
    solver: RungeKutta = Tsit5(),  # noqa: B008
    rtol: float = 1e-6,
    atol: float = 1e-8,
    t_eval: Sequence[float] | torch.Tensor | None = None,
    max_steps: int = 10_000,
    dt0: float | None = None,
    params: Sequence[torch.Tensor] | None = None,
    gradient: Adjoint = Adjoint(),  # noqa: B008
    args: tuple[torch.Tensor, ...] | torch.Tensor = (),
    event: Event | None = None,
    dense: bool = False,
) -> Solution:
    """odeint whose value is differentiated by an adjoint backward (see `Adjoint`).

    Arguments:
        f: vector field f(t, y, *args); an nn.Module's parameters are found automatically.
        y0, t_span, solver, rtol, atol, max_steps, dt0: as in odeint.
        t_eval: as in odeint: (n,) shared, or (batch, n) per sample (checkpointed backward).
        params: tensors to differentiate besides y0 (default: the parameters that require
            grad of f, and of event.fn, when they are nn.Modules; else none).
        gradient: Adjoint(...): which backward (checkpoints) and the continuous backward's
            tolerances, solver and step bound.
        args: per-sample conditioning, tensors with y0's batch in dim 0, passed as
            f(t, y, *args) and sliced with y when finished samples are dropped; those that
            require grad are differentiated (their adjoint integral is per sample:
            dL/dargs_b = int a_b^T df_b/dargs_b dt).
        event: optional `Event(fn, direction, terminal)`, as in odeint (checkpointed
            backward). A terminal event stops each sample at its own event time; the value
            there, stats["event_t"] and stats["event_y"] are differentiable, the event time
            by the implicit function theorem (Chen, Amos & Nickel 2021), and each sample's
            backward starts at its own event.
        dense: refused (True raises): the adjoint backward differentiates the values at
            t1 / t_eval only, so a dense output's values would carry no gradient. Use
            odeint(..., dense=True) (Backprop: differentiable dense values), or give the
            times as t_eval here.

    Returns:
        Solution whose value is differentiable w.r.t. y0 and params, and w.r.t. t_span's
        entries when they are tensors that require grad (e.g. a learned end time): dL/dt1 =
        g . f(t1, y(t1)) over the samples that ran to t1, dL/dt0 = -a(t0) . f(t0, y0) (dL/dt1
        = 0 with t_eval, whose times are fixed). After backward(), stats["adjoint_nfe"] holds
        the evaluations of f by the backward and stats["adjoint_status"] its `Status` code (an
        int; anything but SUCCESS means the gradients are not usable: the continuous backward
        integrating a stiff field backwards fails, use the checkpointed one). The
        checkpointed backward also reports stats["adjoint_checkpoints"], the states it keeps
        (accepted steps summed over the samples). Gradients are meaningful for samples whose
        status is SUCCESS or EVENT.

    Raises:
        TypeError: gradient not an Adjoint, event not an Event; as odeint otherwise.
        ValueError: dense=True; args not tensors with y0's batch in dim 0; an event or per-sample
            t_eval with Adjoint(checkpoints=False); continuous-backward options where the
            checkpointed backward runs; as odeint otherwise.
    """
    if dense is not False:
        raise ValueError(
            "odeint_adjoint does not take dense=True: its adjoint backward differentiates the "
            "values at t1 / t_eval only. Use odeint(f, y0, ..., dense=True) for a dense output "
            "differentiable by backprop, or pass the query times as t_eval= here."
        )
    if not isinstance(gradient, Adjoint):
        raise TypeError(f"gradient must be Adjoint(...), got {type(gradient).__name__}.")
    check_event(event)
    check_batched_state("y0", y0)
    args = check_args(args, y0, "odeint_adjoint")
    if params is None:
        modules = [m for m in (f, getattr(event, "fn", None)) if isinstance(m, torch.nn.Module)]
        params = tuple(p for m in modules for p in m.parameters() if p.requires_grad)
    params = tuple(params)
    # the forward odeint inside the Function validates every argument
    t_grid = None if t_eval is None else torch.as_tensor(t_eval, dtype=torch.float64)
    per_sample_grid = t_grid is not None and t_grid.dim() == 2
    checkpoints = _use_checkpoints(gradient, solver, event, per_sample_grid)
    t_pair = None
    if isinstance(t_span, (tuple, list)) and len(t_span) == 2:
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in t_span):
            t_pair = torch.stack([
                t.reshape(()).to(torch.float64) if isinstance(t, torch.Tensor)
                else torch.tensor(float(t), dtype=torch.float64)
                for t in t_span
            ])
        t_span = tuple(float(t.detach()) if isinstance(t, torch.Tensor) else t for t in t_span)
    stats: dict = {}
    if checkpoints:
        config = (f, t_span, t_grid, solver, rtol, atol, max_steps, dt0, event, stats,
                  len(params))
        value, event_t, event_y = CheckpointFunction.apply(config, y0, t_pair, *params, *args)
        if event is not None and event.terminal:
            stats["event_t"], stats["event_y"] = event_t, event_y
    else:
        config = (f, t_span, t_grid, solver, rtol, atol, max_steps,
                  dt0, gradient, stats, len(params))
        value = AdjointFunction.apply(config, y0, t_pair, *params, *args)
    status = stats.pop("status")
    return Solution(value, status, stats)
