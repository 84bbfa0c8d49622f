"""Input checks of odeint and its callers, and the checked vector field it evaluates.

Every check raises ValueError/TypeError naming the argument and the fix; error texts name
only what the calling entry point (odeint, odeint_adjoint, NeuralODE) accepts.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_batched_state, check_positive, check_positive_int, check_tolerances
from ._controller import PIController
from ._events import Event
from ._implicit import ImplicitRK
from ._rk import time_like
from ._solvers import RungeKutta

__all__ = ["check_args", "check_event", "check_inputs", "check_options", "check_t_eval"]

# Which public entry point runs this odeint (for error texts that name what it accepts).
_API: contextvars.ContextVar[str] = contextvars.ContextVar("equilibria_ode_api",
                                                           default="odeint")


@contextlib.contextmanager
def _api(name: str):
    # the outermost entry point names itself (NeuralODE runs odeint_adjoint runs odeint)
    token = _API.set(name if _API.get() == "odeint" else _API.get())
    try:
        yield
    finally:
        _API.reset(token)

# What each public entry point accepts, for the hint of a failure after compaction.
_CLOSURE_FIX = {
    "odeint": "pass them as odeint(..., args=(x,)) so they are sliced with y, or use "
              "compact=False",
    "odeint_adjoint": "pass them as odeint_adjoint(..., args=(x,)) so they are sliced with y",
    "NeuralODE": "pass them as NeuralODE(...)(y0, args=(x,)) so they are sliced with y",
}


class _Field:
    """f(t, y, *args) with the output checked, args sliced to the rows still running."""

    def __init__(self, f: Callable, args: tuple[torch.Tensor, ...], batch: int,
                 api: str = "odeint") -> None:
        self.f = f
        self.args = args
        self.batch = batch
        self.fix = _CLOSURE_FIX[api]

    def select(self, rows: torch.Tensor) -> None:
        self.args = tuple(a.index_select(0, rows) for a in self.args)

    def on_rows(self, rows: torch.Tensor) -> _Field:
        """This field on a subset of the current rows (args sliced to them)."""
        sub = _Field(self.f, self.args, self.batch)
        sub.fix = self.fix
        sub.select(rows)
        return sub

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        compacted = y.shape[0] != self.batch
        try:
            out = self.f(t, y, *self.args)
        except RuntimeError as error:
            if not compacted:
                raise
            raise ValueError(
                f"f failed on a batch of {y.shape[0]} rows (the {self.batch}-sample batch "
                f"with finished samples dropped). If f closes over batch-shaped tensors, "
                f"{self.fix}."
            ) from error
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"f must return a tensor, got {type(out).__name__}.")
        if out.shape != y.shape or out.dtype != y.dtype or out.device != y.device:
            hint = ""
            if out.dim() > y.dim():
                hint = (
                    f" (t has shape (batch, 1, ..., 1) = {tuple(t.shape)} and broadcasts "
                    "against y as it is; code written for a (batch,) t, like t[:, None] * y, "
                    "adds a dimension: drop the indexing)"
                )
            elif compacted:
                hint = (
                    " (rows were dropped from the batch: if f closes over batch-shaped "
                    f"tensors, {self.fix})"
                )
            raise ValueError(
                f"f returned {tuple(out.shape)} {out.dtype} on {out.device} for y of "
                f"{tuple(y.shape)} {y.dtype} on {y.device}; f(t, y) must return dy/dt with "
                f"y's shape, dtype and device{hint}."
            )
        return out


def check_args(args: Any, y0: torch.Tensor, api: str) -> tuple[torch.Tensor, ...]:
    """Per-sample conditioning: a tensor or a tuple of tensors, each with y0's batch in dim 0.

    Raises:
        TypeError: args not a tensor / tuple of tensors.
        ValueError: a tensor whose dim 0 is not y0's batch.
    """
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"{api}: args must be a tensor or a tuple of tensors with y0's batch in dim 0, got "
            f"{type(args).__name__}."
        )
    batch = y0.shape[0]
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{api}: args[{i}] must be a tensor, got {type(a).__name__}.")
        if a.dim() == 0 or a.shape[0] != batch:
            got = "a 0-dim tensor" if a.dim() == 0 else f"batch {a.shape[0]}"
            raise ValueError(
                f"{api}: args[{i}] has {got} (shape {tuple(a.shape)}) but y0 has batch {batch}; "
                "args are per-sample, sliced with y: give each a dim 0 of y0's batch (a tensor "
                "shared by all samples: x.expand(batch, ...), or close over it in f)."
            )
    return tuple(args)


def check_t_eval(t_eval: Any, t0: float, t1: float, batch: int | None = None) -> torch.Tensor:
    """t_eval as float64 on the CPU: (n,) shared by all samples, or (batch, n) per sample
    (when `batch` is given), each row strictly monotone towards t1 and inside t_span."""
    t_eval = torch.as_tensor(t_eval, dtype=torch.float64).detach().cpu()
    per_sample = t_eval.dim() == 2 and batch is not None
    if (t_eval.dim() != 1 and not per_sample) or t_eval.numel() == 0:
        shapes = "(n,) or (batch, n)" if batch is not None else "(n,)"
        raise ValueError(
            f"t_eval must be a non-empty {shapes} sequence of times, got shape "
            f"{tuple(t_eval.shape)}."
        )
    if per_sample and t_eval.shape[0] != batch:
        raise ValueError(
            f"a per-sample t_eval must have shape (batch, n) = ({batch}, n), got "
            f"{tuple(t_eval.shape)}; one row of times per sample of y0."
        )
    if not bool(torch.isfinite(t_eval).all()):
        raise ValueError("t_eval contains inf or NaN.")
    lo, hi = min(t0, t1), max(t0, t1)
    if float(t_eval.min()) < lo or float(t_eval.max()) > hi:
        raise ValueError(
            f"t_eval must lie inside t_span [{lo}, {hi}], got values in "
            f"[{float(t_eval.min())}, {float(t_eval.max())}]."
        )
    steps = (t_eval[..., 1:] - t_eval[..., :-1]) * (1.0 if t1 > t0 else -1.0)
    if bool((steps <= 0).any()):
        where = ""
        if per_sample:
            rows = (steps <= 0).any(dim=1).nonzero().flatten()[:8].tolist()
            where = f" (rows {rows})"
        raise ValueError(
            f"t_eval must be strictly monotone in the direction of integration (from t_span[0] "
            f"towards t_span[1]){where}; sort each row."
        )
    return t_eval


def check_event(event: Any) -> None:
    """An Event or None.

    Raises:
        TypeError: anything else, with how to wrap a function.
    """
    if event is not None and not isinstance(event, Event):
        raise TypeError(
            f"event must be an equilibria.ode.Event(fn, direction, terminal), got "
            f"{type(event).__name__}; wrap a function as Event(fn)."
        )


def check_options(controller: Any, event: Any, error_norm: Any) -> None:
    """odeint's step-control and event options: a PIController, an Event or None, a callable
    norm or None.

    Raises:
        TypeError: naming the option and what it must be.
    """
    if not isinstance(controller, PIController):
        raise TypeError(f"controller must be a PIController, got {type(controller).__name__}.")
    check_event(event)
    if error_norm is not None and not callable(error_norm):
        raise TypeError(
            f"error_norm must be callable (rows, ...) -> (rows,), got {type(error_norm).__name__}."
        )


def check_inputs(f, y0, t_span, solver, rtol, atol, max_steps, dt0, n_steps, terminate, args):
    if not callable(f):
        raise TypeError(f"f must be callable f(t, y), got {type(f).__name__}.")
    check_batched_state("y0", y0)
    if y0.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"y0 has dtype {y0.dtype}: odeint keeps its own arithmetic (error norms, step "
            "control, dense output) in y0's dtype, which half precision cannot carry (the "
            "default atol is 0 in it); pass y0.float() and run f in low precision under "
            "torch.autocast."
        )
    if not isinstance(solver, (RungeKutta, ImplicitRK)):
        raise TypeError(
            f"solver must be an equilibria.ode solver object (Euler(), RK4(), Tsit5(), ..., "
            f"or implicit Kvaerno3(), Kvaerno5()), got {type(solver).__name__}."
        )
    if not isinstance(t_span, (tuple, list)) or len(t_span) != 2:
        raise ValueError(f"t_span must be a pair (t0, t1), got {t_span!r}.")
    if torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in t_span
    ):
        raise ValueError(
            "t_span requires grad, but odeint does not differentiate with respect to the time "
            "span (the gradient would be lost): use odeint_adjoint or NeuralODE(gradient="
            "Adjoint()), which do, or pass t_span as floats / detached tensors."
        )
    for v in t_span:
        if isinstance(v, torch.Tensor) and v.numel() != 1:
            raise ValueError(
                f"t_span must hold two scalars (t0, t1) shared by the batch, got a tensor of "
                f"shape {tuple(v.shape)}; for per-sample times pass t_eval of shape (batch, n)."
            )
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"t_span must hold two numbers (t0, t1), got {t_span!r}.")
    t0, t1 = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in t_span)
    if not (torch.isfinite(torch.tensor([t0, t1])).all()):
        raise ValueError(f"t_span must be finite, got {t_span!r}.")
    atol, rtol = check_tolerances(atol, rtol)
    tiny = torch.finfo(y0.dtype).tiny
    if atol < tiny:
        # err / (atol + rtol |y|) would divide by 0 where y = 0, and read as f's inf
        raise ValueError(
            f"atol={atol:g} is below the smallest normal number of y0's dtype {y0.dtype} "
            f"({tiny:.1e}); pass atol >= {tiny:.1e}, or y0 in float64."
        )
    check_positive_int("max_steps", max_steps)
    if dt0 is not None:
        number = isinstance(dt0, (int, float)) and not isinstance(dt0, bool)
        dt0 = check_positive("dt0", abs(dt0) if number else dt0)
    if n_steps is not None:
        check_positive_int("n_steps", n_steps)
        if dt0 is not None:
            raise ValueError("pass either dt0 or n_steps, not both.")
    if not solver.adaptive and dt0 is None and n_steps is None:
        raise ValueError(
            f"{type(solver).__name__} is a fixed-step method: pass dt0=... (the step size) or "
            "n_steps=..., or use an adaptive solver (Bosh3(), Dopri5(), Tsit5())."
        )
    if terminate is not None and not callable(terminate):
        raise TypeError("terminate must be callable terminate(t, y, dydt) -> (batch,) bool.")
    return t0, t1, rtol, atol, dt0, check_args(args, y0, _API.get())


def call_terminate(terminate, t, y, dydt, dtype) -> torch.Tensor:
    hit = terminate(time_like(t, y), y, dydt)
    if not isinstance(hit, torch.Tensor) or hit.shape != (y.shape[0],):
        shape = tuple(hit.shape) if isinstance(hit, torch.Tensor) else type(hit).__name__
        hint = (
            " It is called on the rows still running (finished ones are dropped): compute "
            "it row-wise from (t, y, dydt), or use compact=False."
            if isinstance(hit, torch.Tensor) and hit.dim() == 1
            else ""
        )
        raise ValueError(
            f"terminate must return a (batch,) = ({y.shape[0]},) bool tensor, got {shape}."
            + hint
        )
    return hit.to(torch.bool)
