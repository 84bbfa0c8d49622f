"""odeint: batched Runge–Kutta integration (explicit or ESDIRK) with per-sample step control.

Every sample b has its own time t_b, step dt_b, accept/reject decision and status; updates
are merged with ``torch.where`` masks, so a sample's trajectory does not depend on its
batch-mates (beyond the float reduction order of f on a different batch size). Finished
samples stop changing, and once at most half of the rows still run, the finished rows are
dropped from the batch ("compaction"), so they stop costing evaluations of f.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._autocast import outside_autocast
from .._solution import Solution, Status
from ._controller import PIController, initial_step, scaled_error
from ._dense_output import DenseRecorder
from ._events import Event, event_records, locate, state_at
from ._implicit import ImplicitRK, esdirk_stages
from ._inputs import _API, _Field, call_terminate, check_inputs, check_options, check_t_eval
from ._interp import dense_stages
from ._rk import rk_stages, time_like
from ._solvers import RungeKutta, Tsit5
from ._stopping import RUNNING, stop_statuses
from ._t_eval import fill_t_eval, finish_t_eval, points_inside, start_t_eval
from ._tape import record_step

__all__ = ["odeint"]

# Drop finished rows once at least this fraction of the batch still runs no more: a
# compaction costs a few index_selects of the state, far less than evaluating f on rows
# that no longer change, so it pays as soon as an eighth of the rows are done.
_COMPACT_FRACTION = 0.875


def _rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape((-1,) + (1,) * (like.dim() - 1))


def _among(active: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """mask & active, where active None means every row runs."""
    return mask if active is None else active & mask


def _where_active(active: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor
                  ) -> torch.Tensor:
    """torch.where(active, new, old), where active None means every row runs (new as is:
    the same values, without the masked copy)."""
    return new if active is None else torch.where(active, new, old)


def _row_finite(x: torch.Tensor) -> torch.Tensor:
    # A sum is non-finite iff some element is (barring overflow of huge finite values).
    return torch.isfinite(x.reshape(x.shape[0], -1).sum(dim=1))


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
    event: Event | None = None,
    dense: bool = False,
    _tape: list | None = None,
) -> Solution:
    """Integrate dy/dt = f(t, y) from t_span[0] to t_span[1], every sample on its own steps.

    Adaptive methods (Bosh3, Dopri5, Tsit5; implicit Kvaerno3, Kvaerno5) accept a step when
    the per-sample RMS of y_err / (atol + rtol max(|y|, |y_new|)) is <= 1 and choose the next
    one with a PI controller; the first step comes from Hairer's algorithm unless dt0 is
    given. Implicit (ESDIRK) methods, for stiff problems, solve their stages per sample by
    Newton's method (see `equilibria.ode.esdirk_stages`); a sample whose Newton iterations
    fail has its step rejected and retried with 0.3 dt. Fixed-step
    methods take steps of dt0 (or (t1 - t0)/n_steps); the last step is shortened to land on t1.
    With t_eval, values at those times come from dense output (Dopri5/Tsit5: their own
    4th-order interpolants; Dopri8: 7th order, on 5 extra evaluations of f on the steps
    that hold a t_eval point or an event; others: cubic Hermite), so t_eval does not change
    the steps.

    Arguments:
        f: vector field f(t, y, *args) -> dy/dt; t has shape (batch, 1, ..., 1) (each
            sample's own time, in y's dtype, broadcasting against y: ``torch.sin(t) * y`` is
            right as written), y shape (batch, ...). Rows must be independent.
        y0: (batch, ...) initial state, float32 or float64, any device.
        t_span: (t0, t1); t1 < t0 integrates backwards in time.
        solver: a solver object (Euler(), Midpoint(), Heun(), RK4(), Bosh3(), Dopri5(),
            Tsit5(), ExplicitRK(tableau); implicit Kvaerno3(), Kvaerno5()).
        rtol, atol: tolerances of the local error test (adaptive methods).
        t_eval: optional increasing (or, backwards, decreasing) times inside t_span: (n,)
            shared by all samples, or (batch, n), each sample its own times.
        max_steps: per-sample bound on attempted steps (accepted + rejected).
        dt0: first step size (adaptive) or the step size (fixed-step); sign is ignored.
        n_steps: take this many equal steps of (t1 - t0)/n_steps, with any method (an
            adaptive one then runs without step control; its error estimate is unused).
        terminate: optional hook terminate(t, y, dydt) -> (batch,) bool, called after every
            accepted step (t shaped as for f, dydt = f(t, y)); True stops that sample with
            Status.EVENT at the end of that step (nothing is located: use `event` for the
            time at which a condition is met). Like f, it sees only the rows still running
            and must be row-wise.
        throw: raise EquilibriaError when any sample failed.
        controller: the PIController for adaptive methods.
        args: tensors with the batch in dim 0, passed as f(t, y, *args) and sliced together
            with y when finished samples are dropped.
        compact: drop finished samples from the batch once at most half still run.
        error_norm: per-row norm of the scaled local error, (rows, ...) -> (rows,), for the
            step test (default: RMS over the row). E.g. a seminorm that leaves out
            components nothing else depends on (the adjoint's parameter integrals).
        event: optional `Event(fn, direction, terminal)`: the time where fn(t, y, *args)
            crosses 0 is located per sample on the dense output of the step that contains
            it (to a few ulps of t; accurate to the solver's tolerance). Terminal: the
            sample stops there with Status.EVENT (also inside the last step). With autograd
            recording, the event time and state carry their implicit-function-theorem
            derivative (Chen, Amos & Nickel 2021).
        dense: keep every sample's accepted steps so that ``solution.dense.evaluate(t)``
            gives the solution at any time of the sample's solved span after the solve, on
            the interpolant t_eval uses (see `DenseOutput`; memory: about s + 2 states per
            accepted step per sample; Dopri8 then evaluates its 5 extra dense stages on
            every accepted step).
        _tape: internal (odeint_adjoint's checkpointed backward): a list that receives one
            `StepRecord` per step with an accepted row (its start state, times, event and
            t_eval positions; no graph). One more host sync per step on CUDA.

    Returns:
        Solution with value (batch, ...) at t1 (or at each sample's stopping time), or
        (n, batch, ...) with t_eval (value[i, b] at t_eval[i], or at t_eval[b, i] per
        sample; a sample that stopped early holds its final state at later t_eval points);
        status (batch,) int64 (SUCCESS, EVENT, MAX_STEPS,
        NONFINITE with the last finite state, STEP_SIZE_TOO_SMALL, NEWTON_FAILED); stats:
        "nfe", "n_steps" (accepted), "n_rejected" (int64, (batch,)) and "t" (float64,
        (batch,), final time: the event time for a terminal event). With a terminal event
        also "event_t" ((batch,), y's dtype, differentiable; NaN where no event) and
        "event_y" ((batch, ...), the state at the event, differentiable; NaN rows where
        none); with a non-terminal one "n_events" ((batch,) int64) and "event_times"
        ((batch, max n_events) float64, in time order, NaN-padded; at most one event per
        sample per step is found).
        With dense=True, ``solution.dense`` is the `DenseOutput` (else None).

    Raises:
        ValueError: non-finite y0, bad t_span/t_eval, rtol/atol <= 0, max_steps < 1, missing
            dt0 for a fixed-step method, f returning the wrong shape/dtype/device, an event
            function not returning one floating value per sample.
        TypeError: y0 not a tensor, unknown solver type, event not an Event.
        EquilibriaError: with throw=True when a sample failed.

    Under ``torch.autocast`` f runs in the autocast dtype (its output cast back to y0's
    dtype); the steps, error control and dense output run with autocast off.

    Host syncs: one per step on CPU, one per 4 steps on CUDA (to stop once every sample is
    done and to compact); with t_eval one more per interpolation round of an accepted step.

    Reference: Hairer, Nørsett, Wanner, *Solving ODEs I* (2nd ed.), II.4-II.6.
    """
    t0, t1, rtol, atol, dt0, args = check_inputs(
        f, y0, t_span, solver, rtol, atol, max_steps, dt0, n_steps, terminate, args
    )
    check_options(controller, event, error_norm)
    if not isinstance(dense, bool):
        raise TypeError(f"dense must be True or False, got {type(dense).__name__}.")
    tab = solver.tableau
    # n_steps forces equal steps, also for an adaptive method (its error estimate unused)
    adaptive = solver.adaptive and n_steps is None
    batch, device, dtype = y0.shape[0], y0.device, y0.dtype
    t_grid = None if t_eval is None else check_t_eval(t_eval, t0, t1, y0.shape[0])
    i64 = dict(dtype=torch.int64, device=device)
    f64 = dict(dtype=torch.float64, device=device)

    recorder = DenseRecorder(tab) if dense else None
    if t0 == t1 or batch == 0:
        value = (y0 if t_grid is None
                 else y0.unsqueeze(0).expand(t_grid.shape[-1], *y0.shape))
        zeros = torch.zeros(batch, **i64)
        t_final = torch.full((batch,), t1, **f64)
        return Solution(value, torch.zeros(batch, **i64),
                        {"nfe": zeros, "n_steps": zeros.clone(), "n_rejected": zeros.clone(),
                         "t": t_final},
                        dense=None if recorder is None
                        else recorder.finish(y0, t0, t1, t_final, zeros))

    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
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
    status = torch.full((batch,), RUNNING, **i64)
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
    implicit = isinstance(solver, ImplicitRK)
    # implicit methods: per-sample Jacobians kept across steps (dense path), which samples
    # need a fresh one, consecutive Newton failures and whether the latest rejection was one
    jacobian = None
    refresh = torch.ones(batch, dtype=torch.bool, device=device)
    eta = torch.ones(batch, **f64)
    n_newton_bad = torch.zeros(batch, **i64)
    newton_recent = torch.zeros(batch, dtype=torch.bool, device=device)

    # events: g at each row's current state; a terminal event's time (y's dtype, carrying
    # its gradient) and state; a non-terminal event's (sample, time) records
    g_old = event_t = event_y = None
    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    if event is not None:
        with torch.no_grad():
            g_old = event.value(t, y, field.args)
        event_t = torch.full((batch,), float("nan"), dtype=dtype, device=device)
        event_y = torch.full_like(y0, float("nan"))

    # --- results for the whole batch, filled when rows leave the batch ---
    full = {"y": y0, "t": t.clone(), "status": status.clone(), "nfe": nfe.clone(),
            "n_steps": n_accepted.clone(), "n_rejected": n_rejected.clone()}
    if event is not None:
        full["event_t"], full["event_y"] = event_t.clone(), event_y.clone()
    out = grid = next_i = None
    if t_grid is not None:
        out, grid, next_i = start_t_eval(t_grid, y0, t0)
        full["next_i"] = next_i.clone()

    def flush() -> None:
        full["y"] = full["y"].index_copy(0, idx, y)
        for key, value in (("t", t), ("status", status), ("nfe", nfe), ("n_steps", n_accepted),
                           ("n_rejected", n_rejected)):
            full[key] = full[key].index_copy(0, idx, value)
        if next_i is not None:
            full["next_i"] = full["next_i"].index_copy(0, idx, next_i)
        if event is not None:
            full["event_t"] = full["event_t"].index_copy(0, idx, event_t)
            full["event_y"] = full["event_y"].index_copy(0, idx, event_y)

    # On CUDA, reading "how many still run" back to the host stalls the launch queue: look
    # only every few steps (the rows already done are masked no-ops in between). On CPU the
    # read is free, so look every step.
    sync_every = 1 if device.type == "cpu" else 4
    # Whether the host knows that every row still runs (from the read at the end of the
    # previous step, or because compaction just kept only running rows; False after a step
    # without a read): then the step's masks by `active` are skipped (active None), the same
    # values without the masked copies.
    all_running = False
    for iteration in range(max_steps):
        active = None if all_running else status == RUNNING
        with torch.no_grad():
            remaining = (t1 - t) if direction > 0 else (t - t1)
            if n_steps is not None:
                # exactly n_steps steps; times t0 + k dt computed, not accumulated
                last = n_accepted + 1 >= n_steps
            else:
                # a remainder longer than dt only by rounding is taken as the last step,
                # not followed by a spurious ~1e-16 step
                last = remaining <= dt.abs() * (1.0 + 1e-9)
            dt_step = torch.where(last, remaining, dt.abs())
            if direction < 0:
                dt_step = -dt_step
            if active is not None:
                dt_step = torch.where(active, dt_step, 0.0)
        if implicit:
            y_new, y_err, stages, step_nfe, newton_ok, jacobian, theta, eta_new = esdirk_stages(
                field, t, y, dt_step, solver, k1, rtol, atol, jacobian, refresh, eta
            )
            eta = _where_active(active, eta_new, eta)
        else:
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
                accept = _among(active, finite & (err <= 1.0))
            else:
                accept = _among(active, finite)
            if implicit:
                accept = accept & newton_ok  # not in place: accept may be `finite` itself
                nfe += step_nfe
                failed = _among(active, finite & ~newton_ok)
                n_newton_bad = torch.where(failed, n_newton_bad + 1,
                                           _where_active(active, 0, n_newton_bad))
                newton_recent = torch.where(_among(active, ~accept), failed, newton_recent)
                # a slow or failed Newton gets a fresh Jacobian (at the state it retries from)
                refresh = _where_active(active, ~newton_ok | (theta > solver.newton.refresh),
                                        refresh)
            else:
                nfe += stage_nfe if active is None else active.long() * stage_nfe
            n_accepted += accept
            rejected = _among(active, ~accept)
            n_rejected += rejected
            n_bad = torch.where(_among(active, ~finite), n_bad + 1, 0)
            bad_recent = torch.where(rejected, ~finite, bad_recent)

        stop = None  # rows whose terminal event lies inside this accepted step
        t_end, y_end = t_new, y_new
        crossed = torch.zeros_like(accept)
        if event is not None:
            with torch.no_grad():
                g_new = event.value(t_new, y_new, field.args)
                g_start = g_old
                crossed = accept & event.crosses(g_start, g_new)
                g_old = torch.where(accept, g_new, g_old)
        if tab.dense_stages:
            # extra stages of the dense output (Dopri8) only where a value strictly inside
            # the step is needed (a t_eval point at the step's end is y_new itself)
            need = crossed | accept if recorder is not None else crossed
            if out is not None:
                inside, pos = points_inside(grid, next_i, idx, accept, t_new, direction)
                need = need | (inside & (grid[idx, pos] != t_new))
            if bool(need.any()):
                stages, extra = dense_stages(field, tab, t, dt_step, y, stages, need)
                nfe += extra
        if event is not None:
            if bool(crossed.any()):
                theta_event = locate(event, field.args, tab, crossed, t, dt_step, y, y_new,
                                     stages, k_next, g_start, g_new)
                t_event = t + theta_event * dt_step
                if event.terminal:
                    stop = crossed
                    y_hit, t_hit, extra = state_at(event, field, tab, theta_event, t_event,
                                                   dt_step, y, y_new, stages, k_next)
                    nfe += stop.long() * extra  # f at the event, for the derivative
                    t_end = torch.where(stop, t_event, t_new)
                    y_end = torch.where(_rows(stop, y), y_hit, y_new)
                    event_t = torch.where(stop, t_hit, event_t)
                    event_y = torch.where(_rows(stop, y), y_hit, event_y)
                else:
                    rows = crossed.nonzero().flatten()
                    records.append((idx.index_select(0, rows), t_event.index_select(0, rows)))

        eval_before = next_i
        if out is not None:
            next_i = fill_t_eval(out, grid, next_i, idx, accept, t, t_end, dt_step, direction,
                                 tab, y, y_new, stages, k_next, y_end)

        if recorder is not None:
            recorder.record(accept, idx, t, t_end, dt_step, y, y_new, y_end, stages, k_next)
        if _tape is not None:
            record_step(_tape, accept, idx, t, t_new, dt_step, y, stop,
                        theta_event if stop is not None else None, eval_before, next_i)
        acc_rows = _rows(accept, y)
        y = torch.where(acc_rows, y_end, y)
        k1 = torch.where(acc_rows, k_next, k1)
        with torch.no_grad():
            t = torch.where(accept, t_end, t)
            if adaptive:
                factor = controller.factor(err.nan_to_num(1e10), err_prev, accept, k_order)
                factor = torch.where(finite, factor, torch.full_like(factor,
                                                                     controller.min_factor))
                if implicit:
                    # Newton failed: the step was too long for the stage solves to converge
                    factor = torch.where(finite & ~newton_ok, torch.full_like(factor, 0.3),
                                         factor)
                dt = _where_active(active, dt_step * factor, dt)
                err_prev = torch.where(accept, err.clamp_min(1e-4), err_prev)
            # --- who stops here, and why ---
            hit = None if terminate is None else call_terminate(terminate, t, y, k1, dtype)
            status = stop_statuses(
                status, accept=accept, last=last, stop=stop, hit=hit, t=t, dt=dt, n_bad=n_bad,
                bad_recent=bad_recent, n_newton_bad=n_newton_bad, newton_recent=newton_recent,
                n_attempts=n_accepted + n_rejected, max_steps=max_steps, adaptive=adaptive,
                implicit=implicit)

        all_running = False
        if (iteration + 1) % sync_every:
            continue
        with torch.no_grad():
            still = status == RUNNING
            n_running = int(still.sum())  # the host sync
        if n_running == 0:
            break
        all_running = n_running == still.numel()
        if compact and n_running <= _COMPACT_FRACTION * still.numel():
            all_running = True  # the rows kept are the running ones
            flush()
            keep = still.nonzero().flatten()
            (idx, t, dt, y, k1, status, nfe, n_accepted, n_rejected, n_bad, bad_recent,
             err_prev, next_i, g_old, event_t, event_y, refresh, n_newton_bad, newton_recent,
             eta, jacobian) = (
                None if x is None else x.index_select(0, keep)
                for x in (idx, t, dt, y, k1, status, nfe, n_accepted, n_rejected, n_bad,
                          bad_recent, err_prev, next_i, g_old, event_t, event_y, refresh,
                          n_newton_bad, newton_recent, eta, jacobian)
            )
            field.select(keep)
    status = torch.where(status == RUNNING, int(Status.MAX_STEPS), status)
    flush()

    value = full["y"]
    if out is not None:
        value = finish_t_eval(out, value, full["next_i"])
    stats = {"nfe": full["nfe"], "n_steps": full["n_steps"], "n_rejected": full["n_rejected"],
             "t": full["t"]}
    if event is not None and event.terminal:
        stats["event_t"], stats["event_y"] = full["event_t"], full["event_y"]
    elif event is not None:
        stats.update(event_records(records, batch, device))
    solution = Solution(value, full["status"], stats)
    if recorder is not None:
        solution.dense = recorder.finish(y0, t0, t1, full["t"], full["status"])
    if throw:
        solution.raise_if_failed("odeint")
    return solution

