"""odeint: batched explicit Runge–Kutta integration with per-sample step control.

Every sample b has its own time t_b, step dt_b, accept/reject decision and status; updates
are merged with ``torch.where`` masks, so a sample's trajectory does not depend on its
batch-mates (beyond the float reduction order of f on a different batch size). Finished
samples stop changing, and once at most half of the rows still run, the finished rows are
dropped from the batch ("compaction"), so they stop costing evaluations of f.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._autocast import outside_autocast
from .._checks import (
    check_batched_state,
    check_positive,
    check_positive_int,
    check_tolerances,
)
from .._solution import Solution, Status
from ._controller import PIController, initial_step, scaled_error
from ._interp import dense_value
from ._rk import rk_stages, time_like
from ._solvers import RungeKutta, Tsit5

__all__ = ["check_args", "check_t_eval", "odeint"]

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

_RUNNING = -1
# Drop finished rows once at least this fraction of the batch still runs no more: a
# compaction costs a few index_selects of the state, far less than evaluating f on rows
# that no longer change, so it pays as soon as an eighth of the rows are done.
_COMPACT_FRACTION = 0.875
# Consecutive non-finite step attempts (each shrinking dt by min_factor) before a sample is
# declared NONFINITE: 0.2^10 ~ 1e-7, so a blow-up that smaller steps cannot avoid is reported
# instead of grinding down to the dt floor.
_MAX_NONFINITE_TRIES = 10


def _rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape((-1,) + (1,) * (like.dim() - 1))


def _row_finite(x: torch.Tensor) -> torch.Tensor:
    # A sum is non-finite iff some element is (barring overflow of huge finite values).
    return torch.isfinite(x.reshape(x.shape[0], -1).sum(dim=1))


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


def check_t_eval(t_eval: Any, t0: float, t1: float) -> torch.Tensor:
    t_eval = torch.as_tensor(t_eval, dtype=torch.float64).detach().cpu()
    if t_eval.dim() != 1 or t_eval.numel() == 0:
        raise ValueError(
            f"t_eval must be a non-empty 1-D sequence, got shape {tuple(t_eval.shape)}."
        )
    if not bool(torch.isfinite(t_eval).all()):
        raise ValueError("t_eval contains inf or NaN.")
    lo, hi = min(t0, t1), max(t0, t1)
    if float(t_eval.min()) < lo or float(t_eval.max()) > hi:
        raise ValueError(
            f"t_eval must lie inside t_span [{lo}, {hi}], got values in "
            f"[{float(t_eval.min())}, {float(t_eval.max())}]."
        )
    steps = (t_eval[1:] - t_eval[:-1]) * (1.0 if t1 > t0 else -1.0)
    if bool((steps <= 0).any()):
        raise ValueError(
            "t_eval must be strictly monotone in the direction of integration (from t_span[0] "
            "towards t_span[1])."
        )
    return t_eval


def _check_inputs(f, y0, t_span, solver, rtol, atol, max_steps, dt0, n_steps, terminate, args):
    if not callable(f):
        raise TypeError(f"f must be callable f(t, y), got {type(f).__name__}.")
    check_batched_state("y0", y0)
    if not isinstance(solver, RungeKutta):
        raise TypeError(
            f"solver must be an equilibria.ode solver object (Euler(), RK4(), Tsit5(), ...), "
            f"got {type(solver).__name__}."
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
    t0, t1 = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in t_span)
    if not (torch.isfinite(torch.tensor([t0, t1])).all()):
        raise ValueError(f"t_span must be finite, got {t_span!r}.")
    atol, rtol = check_tolerances(atol, rtol)
    check_positive_int("max_steps", max_steps)
    if dt0 is not None:
        dt0 = check_positive("dt0", abs(dt0) if isinstance(dt0, (int, float)) else dt0)
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


@outside_autocast(fn="f", state="y0")
def odeint(
    f: Callable[..., torch.Tensor],
    y0: torch.Tensor,
    t_span: tuple[float, float] = (0.0, 1.0),
    solver: RungeKutta = Tsit5(),  # noqa: B008  (frozen dataclass: immutable default)
    rtol: float = 1e-6,
    atol: float = 1e-8,
    t_eval: Sequence[float] | torch.Tensor | None = None,
    max_steps: int = 10_000,
    dt0: float | None = None,
    n_steps: int | None = None,
    terminate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    throw: bool = False,
    controller: PIController = PIController(),  # noqa: B008
    args: tuple[torch.Tensor, ...] = (),
    compact: bool = True,
    error_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Solution:
    """Integrate dy/dt = f(t, y) from t_span[0] to t_span[1], every sample on its own steps.

    Adaptive methods (Bosh3, Dopri5, Tsit5) accept a step when the per-sample RMS of
    y_err / (atol + rtol max(|y|, |y_new|)) is <= 1 and choose the next one with a PI
    controller; the first step comes from Hairer's algorithm unless dt0 is given. Fixed-step
    methods take steps of dt0 (or (t1 - t0)/n_steps); the last step is shortened to land on t1.
    With t_eval, values at those times come from dense output (Dopri5/Tsit5: their own
    4th-order interpolants; others: cubic Hermite), so t_eval does not change the steps.

    Arguments:
        f: vector field f(t, y, *args) -> dy/dt; t has shape (batch, 1, ..., 1) (each
            sample's own time, in y's dtype, broadcasting against y: ``torch.sin(t) * y`` is
            right as written), y shape (batch, ...). Rows must be independent.
        y0: (batch, ...) initial state, float32 or float64, any device.
        t_span: (t0, t1); t1 < t0 integrates backwards in time.
        solver: a solver object (Euler(), Midpoint(), Heun(), RK4(), Bosh3(), Dopri5(),
            Tsit5(), ExplicitRK(tableau)).
        rtol, atol: tolerances of the local error test (adaptive methods).
        t_eval: optional increasing (or, backwards, decreasing) times inside t_span.
        max_steps: per-sample bound on attempted steps (accepted + rejected).
        dt0: first step size (adaptive) or the step size (fixed-step); sign is ignored.
        n_steps: take this many equal steps of (t1 - t0)/n_steps, with any method (an
            adaptive one then runs without step control; its error estimate is unused).
        terminate: optional hook terminate(t, y, dydt) -> (batch,) bool, called after every
            accepted step (t: (batch,), dydt = f(t, y)); True stops that sample with
            Status.EVENT. The continuous DEQ path stops at ||dy/dt|| <= atol + rtol ||y||.
            Like f, it sees only the rows still running and must be row-wise.
        throw: raise EquilibriaError when any sample failed.
        controller: the PIController for adaptive methods.
        args: tensors with the batch in dim 0, passed as f(t, y, *args) and sliced together
            with y when finished samples are dropped.
        compact: drop finished samples from the batch once at most half still run.
        error_norm: per-row norm of the scaled local error, (rows, ...) -> (rows,), for the
            step test (default: RMS over the row). E.g. a seminorm that leaves out
            components nothing else depends on (the adjoint's parameter integrals).

    Returns:
        Solution with value (batch, ...) at t1 (or at each sample's stopping time), or
        (len(t_eval), batch, ...) with t_eval (a sample that stopped early holds its final
        state at later t_eval points); status (batch,) int64 (SUCCESS, EVENT, MAX_STEPS,
        NONFINITE with the last finite state, STEP_SIZE_TOO_SMALL); stats: "nfe", "n_steps"
        (accepted), "n_rejected" (int64, (batch,)) and "t" (float64, (batch,), final time).

    Raises:
        ValueError: non-finite y0, bad t_span/t_eval, rtol/atol <= 0, max_steps < 1, missing
            dt0 for a fixed-step method, f returning the wrong shape/dtype/device.
        TypeError: y0 not a tensor, unknown solver type.
        EquilibriaError: with throw=True when a sample failed.

    Under ``torch.autocast`` f runs in the autocast dtype (its output cast back to y0's
    dtype); the steps, error control and dense output run with autocast off.

    Host syncs: one per step on CPU, one per 4 steps on CUDA (to stop once every sample is
    done and to compact); with t_eval one more per interpolation round of an accepted step.

    Reference: Hairer, Nørsett, Wanner, *Solving ODEs I* (2nd ed.), II.4-II.6.
    """
    t0, t1, rtol, atol, dt0, args = _check_inputs(
        f, y0, t_span, solver, rtol, atol, max_steps, dt0, n_steps, terminate, args
    )
    if not isinstance(controller, PIController):
        raise TypeError(f"controller must be a PIController, got {type(controller).__name__}.")
    if error_norm is not None and not callable(error_norm):
        raise TypeError(
            f"error_norm must be callable (rows, ...) -> (rows,), got {type(error_norm).__name__}."
        )
    tab = solver.tableau
    # n_steps forces equal steps, also for an adaptive method (its error estimate unused)
    adaptive = solver.adaptive and n_steps is None
    batch, device, dtype = y0.shape[0], y0.device, y0.dtype
    t_grid = None if t_eval is None else check_t_eval(t_eval, t0, t1)
    i64 = dict(dtype=torch.int64, device=device)
    f64 = dict(dtype=torch.float64, device=device)

    if t0 == t1 or batch == 0:
        value = y0 if t_grid is None else y0.unsqueeze(0).expand(len(t_grid), *y0.shape)
        zeros = torch.zeros(batch, **i64)
        return Solution(value, torch.zeros(batch, **i64),
                        {"nfe": zeros, "n_steps": zeros.clone(), "n_rejected": zeros.clone(),
                         "t": torch.full((batch,), t1, **f64)})

    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    eps = torch.finfo(dtype).eps
    field = _Field(f, args, batch, _API.get())
    k_order = (tab.error_order or tab.order) + 1

    # --- state of the rows still in the batch (row r is global sample idx[r]) ---
    idx = torch.arange(batch, device=device)
    t = torch.full((batch,), t0, **f64)
    y = y0
    k1 = field(time_like(t, y), y)
    nfe = torch.ones(batch, **i64)
    if n_steps is not None:
        dt0 = span / n_steps
    if dt0 is not None:
        dt = torch.full((batch,), direction * min(dt0, span), **f64)
    else:
        dt = initial_step(field, t, y, k1, direction, tab.order, rtol, atol, span)
        nfe += 1
    status = torch.full((batch,), _RUNNING, **i64)
    # f non-finite at the start: no step size can help; report it with y0 as the last state
    status = torch.where(_row_finite(k1), status, int(Status.NONFINITE))
    n_accepted = torch.zeros(batch, **i64)
    n_rejected = torch.zeros(batch, **i64)
    n_bad = torch.zeros(batch, **i64)
    # whether the latest rejected attempt was non-finite (an approach to a region where f
    # is NaN/inf ends at the dt floor: that is NONFINITE, not STEP_SIZE_TOO_SMALL)
    bad_recent = torch.zeros(batch, dtype=torch.bool, device=device)
    err_prev = torch.ones(batch, **f64)
    stage_nfe = tab.n_stages - 1 + (0 if tab.fsal else 1)

    # --- results for the whole batch, filled when rows leave the batch ---
    full = {"y": y0, "t": t.clone(), "status": status.clone(), "nfe": nfe.clone(),
            "n_steps": n_accepted.clone(), "n_rejected": n_rejected.clone()}
    out = next_i = None
    if t_grid is not None:
        grid = t_grid.to(device)
        n_eval = grid.numel()
        out = y0.new_zeros((n_eval,) + tuple(y0.shape))
        at_start = int((grid == t0).sum())
        if at_start:
            out[0] = y0
        next_i = torch.full((batch,), at_start, **i64)
        full["next_i"] = next_i.clone()

    def flush() -> None:
        full["y"] = full["y"].index_copy(0, idx, y)
        for key, value in (("t", t), ("status", status), ("nfe", nfe), ("n_steps", n_accepted),
                           ("n_rejected", n_rejected)):
            full[key] = full[key].index_copy(0, idx, value)
        if next_i is not None:
            full["next_i"] = full["next_i"].index_copy(0, idx, next_i)

    # On CUDA, reading "how many still run" back to the host stalls the launch queue: look
    # only every few steps (the rows already done are masked no-ops in between). On CPU the
    # read is free, so look every step.
    sync_every = 1 if device.type == "cpu" else 4
    for iteration in range(max_steps):
        active = status == _RUNNING
        with torch.no_grad():
            remaining = (t1 - t) * direction
            if n_steps is not None:
                # exactly n_steps steps; times t0 + k dt computed, not accumulated
                last = n_accepted + 1 >= n_steps
            else:
                # a remainder longer than dt only by rounding is taken as the last step,
                # not followed by a spurious ~1e-16 step
                last = remaining <= dt.abs() * (1.0 + 1e-9)
            dt_step = torch.where(active, torch.where(last, remaining, dt.abs()) * direction,
                                  torch.zeros_like(dt))
        y_new, y_err, stages, _ = rk_stages(field, t, y, dt_step, tab, k1)
        if n_steps is not None:
            t_new = torch.where(last, torch.full_like(t, t1),
                                t0 + (n_accepted + 1).double() * (direction * dt0))
        else:
            t_new = torch.where(last, torch.full_like(t, t1), t + dt_step)
        k_next = stages[-1] if tab.fsal else field(time_like(t_new, y_new), y_new)
        with torch.no_grad():
            finite = _row_finite(y_new) & _row_finite(k_next)
            if adaptive:
                err = scaled_error(
                    y_err.detach(), y.detach(), y_new.detach(), rtol, atol, error_norm
                )
                err = err.double()
                finite &= torch.isfinite(err)
                accept = active & finite & (err <= 1.0)
            else:
                accept = active & finite
            nfe += active.long() * stage_nfe
            n_accepted += accept
            n_rejected += active & ~accept
            n_bad = torch.where(active & ~finite, n_bad + 1, torch.zeros_like(n_bad))
            bad_recent = torch.where(active & ~accept, ~finite, bad_recent)

        if out is not None:
            next_i = _fill_t_eval(out, grid, next_i, idx, accept, t, t_new, dt_step, direction,
                                  tab, y, y_new, stages, k_next)

        acc_rows = _rows(accept, y)
        y = torch.where(acc_rows, y_new, y)
        k1 = torch.where(acc_rows, k_next, k1)
        with torch.no_grad():
            t = torch.where(accept, t_new, t)
            if adaptive:
                factor = controller.factor(err.nan_to_num(1e10), err_prev, accept, k_order)
                factor = torch.where(finite, factor, torch.full_like(factor,
                                                                     controller.min_factor))
                dt = torch.where(active, dt_step * factor, dt)
                err_prev = torch.where(accept, err.clamp_min(1e-4), err_prev)
            # --- who stops here, and why ---
            status = torch.where(accept & last, int(Status.SUCCESS), status)
            if terminate is not None:
                hit = _call_terminate(terminate, t, y, k1, dtype)
                status = torch.where(accept & hit & (status == _RUNNING), int(Status.EVENT), status)
            running = status == _RUNNING
            bad = running & (n_bad >= (_MAX_NONFINITE_TRIES if adaptive else 1))
            status = torch.where(bad, int(Status.NONFINITE), status)
            if adaptive:
                floor = 10 * eps * torch.clamp_min(t.abs(), span)
                small = (status == _RUNNING) & (dt.abs() < floor)
                why = torch.where(bad_recent, int(Status.NONFINITE),
                                  int(Status.STEP_SIZE_TOO_SMALL))
                status = torch.where(small, why, status)
            out_of_steps = (status == _RUNNING) & (n_accepted + n_rejected >= max_steps)
            status = torch.where(out_of_steps, int(Status.MAX_STEPS), status)

        if (iteration + 1) % sync_every:
            continue
        with torch.no_grad():
            still = status == _RUNNING
            n_running = int(still.sum())  # the host sync
        if n_running == 0:
            break
        if compact and n_running <= _COMPACT_FRACTION * still.numel():
            flush()
            keep = still.nonzero().flatten()
            idx, t, dt, y, k1 = (x.index_select(0, keep) for x in (idx, t, dt, y, k1))
            status, nfe, n_accepted, n_rejected, n_bad, bad_recent, err_prev = (
                x.index_select(0, keep)
                for x in (status, nfe, n_accepted, n_rejected, n_bad, bad_recent, err_prev)
            )
            if next_i is not None:
                next_i = next_i.index_select(0, keep)
            field.select(keep)
    status = torch.where(status == _RUNNING, int(Status.MAX_STEPS), status)
    flush()

    value = full["y"]
    if out is not None:
        # Samples that stopped early hold their final state at the t_eval points they never
        # reached (their status says why they stopped).
        unreached = torch.arange(n_eval, device=device)[:, None] >= full["next_i"][None, :]
        out = torch.where(unreached.reshape(unreached.shape + (1,) * (y0.dim() - 1)),
                          value.unsqueeze(0), out)
        value = out
    solution = Solution(
        value,
        full["status"],
        {"nfe": full["nfe"], "n_steps": full["n_steps"], "n_rejected": full["n_rejected"],
         "t": full["t"]},
    )
    if throw:
        solution.raise_if_failed("odeint")
    return solution


def _call_terminate(terminate, t, y, dydt, dtype) -> torch.Tensor:
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


def _fill_t_eval(out, grid, next_i, idx, accept, t, t_new, dt_step, direction, tab, y, y_new,
                 stages, k_next):
    """Write the dense-output value at every t_eval point inside this accepted step."""
    n_eval = grid.numel()
    extra = (1,) * (y.dim() - 1)
    for _ in range(n_eval):
        with torch.no_grad():
            pos = next_i.clamp_max(n_eval - 1)
            t_point = grid[pos]
            inside = accept & (next_i < n_eval) & ((t_point - t_new) * direction <= 0)
            if not bool(inside.any()):
                break
            safe_dt = torch.where(dt_step == 0, torch.ones_like(dt_step), dt_step)
            theta = ((t_point - t) / safe_dt).clamp(0.0, 1.0)
        value = dense_value(tab, theta, dt_step, y, y_new, stages, k_next)
        value = torch.where((t_point == t_new).reshape((-1,) + extra), y_new, value)
        current = out[pos, idx]
        out[pos, idx] = torch.where(inside.reshape((-1,) + extra), value, current)
        next_i = next_i + inside
    return next_i
