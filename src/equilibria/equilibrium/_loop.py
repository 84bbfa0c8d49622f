"""fixed_point(): the one loop that drives every fixed-point solver.

The loop owns everything that is the same for all solvers: input checks, the per-sample
tolerance test, freezing converged samples, best-iterate tracking, divergence detection, the
step bound, compaction of converged rows and the residual trace. A solver only proposes the
next iterate (see `_solver.FixedPointSolver`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._autocast import outside_autocast
from .._checks import (
    check_batched_state,
    check_finite,
    check_positive,
    check_positive_int,
    check_tolerances,
    deliberate_sync,
    out_of_range,
    rms_norm,
    row_norm,
)
from .._context import _ROWS
from .._solution import Solution, Status
from .._structure import Structure
from ._anderson import Anderson
from ._captured import Captured
from ._fused import (
    BestColumn,
    FusedTest,
    _put,
    _take,
    add_pending,
    residual_from,
    stop_or_improve,
)
from ._solver import FixedPointSolver, State, expand_as_batch

__all__ = ["fixed_point"]

# On CUDA `bool(tensor)` waits for the device, so "is every sample done?" is asked every few
# steps only; per-sample freezing is exact regardless (it uses torch.where, no host sync).
_CHECK_EVERY_WITHOUT_SYNC = 4
# A row whose solver rejected a non-finite trial of f on this many consecutive steps (each
# retry smaller) is NONFINITE: f returns NaN/inf there, more steps will not help.
_NONFINITE_STREAK = 8


def _plain_norm(flat: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(flat, dim=1)


def _cheap_sync(device: torch.device) -> bool:
    """Whether reading a tensor on the host costs nothing (CPU) or waits for a device."""
    return device.type == "cpu"


def _solver_choices() -> str:
    return "eq.Picard(), eq.Anderson(), eq.Broyden(), eq.NewtonKrylov(), eq.SteadyState()"


def _check_x(x: Any, batch: int) -> tuple[torch.Tensor, ...] | torch.Tensor | None:
    if x is None:
        return None
    items = [("x", x)] if isinstance(x, torch.Tensor) else None
    if items is None:
        if not isinstance(x, (tuple, list)):
            raise TypeError(
                f"x must be a tensor, a tuple of tensors or None, got {type(x).__name__}."
            )
        items = [(f"x[{i}]", item) for i, item in enumerate(x)]
    for name, item in items:
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(item).__name__}.")
        if item.dim() == 0 or item.shape[0] != batch:
            got = "a scalar" if item.dim() == 0 else f"batch {item.shape[0]}"
            raise ValueError(
                f"{name} must have the batch in dim 0 like z0 (batch {batch}), got {got}; "
                "pass one row per sample (use expand for shared inputs)."
            )
        if item.is_floating_point() or item.is_complex():
            check_finite(name, item)
    return x if isinstance(x, torch.Tensor) else tuple(x)


def _select_rows(x: Any, rows: torch.Tensor | None) -> Any:
    if x is None or rows is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.index_select(0, rows)
    return tuple(item.index_select(0, rows) for item in x)


def _bind(f: Callable, x: Any, base: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """fn(z, rows=None): f on the state's rows, or on the subset `rows` of them.

    `base` is the full-batch index of each state row (None: all rows, in order); f can read
    the full-batch rows of every call from `equilibria._context.current_rows()`.

    Every call's output is checked against z (type, shape, dtype, device: metadata only, no
    sync), so an f that changes what it returns mid-solve gets the same clear error as on
    its first call instead of a wrong-dtype result or a raw error from inside a solver."""

    def fn(z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            token = _ROWS.set(base)
            try:
                out = f(z) if x is None else f(z, x)
            finally:
                _ROWS.reset(token)
            if (
                out.__class__ is not torch.Tensor and not isinstance(out, torch.Tensor)
                or out.shape != z.shape
                or out.dtype != z.dtype
                or out.device != z.device
            ):
                _bad_output(out, z)
            return out
        full = rows if base is None else base.index_select(0, rows)
        token = _ROWS.set(full)
        try:
            out = f(z) if x is None else f(z, _select_rows(x, rows))
        finally:
            _ROWS.reset(token)
        if (
            not isinstance(out, torch.Tensor)
            or out.shape != z.shape
            or out.dtype != z.dtype
            or out.device != z.device
        ):
            _bad_output(out, z)
        return out

    return fn


def _bad_output(out: Any, z: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}.")
    if out.shape != z.shape:
        raise ValueError(
            f"f returned shape {tuple(out.shape)} for z of shape {tuple(z.shape)}; a "
            "fixed-point map must return z's shape."
        )
    if out.dtype != z.dtype:
        raise ValueError(
            f"f returned dtype {out.dtype} for z of dtype {z.dtype}; return z's dtype (or "
            "pass z0 in the dtype f computes in)."
        )
    raise ValueError(
        f"f returned a tensor on {out.device} for z on {z.device}; return z's device (move "
        "f's parameters, or z0 and x, to one device)."
    )


def _check_keep_steps(keep_steps: Any, max_steps: int) -> tuple[int, ...]:
    if not isinstance(keep_steps, (tuple, list)) or any(
        isinstance(s, bool) or not isinstance(s, int) for s in keep_steps
    ):
        raise TypeError(f"keep_steps must be a tuple of ints, got {keep_steps!r}.")
    steps = tuple(keep_steps)
    if list(steps) != sorted(set(steps)) or any(not 1 <= s <= max_steps for s in steps):
        raise ValueError(
            f"keep_steps must be increasing step counts in [1, max_steps={max_steps}], got "
            f"{steps!r}."
        )
    return steps


def _snapshot(value: torch.Tensor) -> torch.Tensor:
    """A kept value: the recorded graph itself when autograd is recording (Unrolled), else a
    copy that later in-place solver updates cannot touch."""
    return value if value.requires_grad else value.detach().clone()


@outside_autocast(fn="f", state="z0")
def fixed_point(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    x: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    solver: FixedPointSolver = Anderson(),  # noqa: B008 (frozen, immutable dataclass)
    *,
    atol: float = 1e-6,
    rtol: float = 1e-6,
    max_steps: int = 100,
    throw: bool = False,
    compact: bool = False,
    trace: bool = False,
    divergence_factor: float = 1e3,
    keep_steps: tuple[int, ...] = (),
) -> Solution:
    """Find z* = f(z*, x) for every sample of a batch.

    Each sample is its own problem: it passes the tolerance test
    ``rms(f(z, x) - z) <= atol + rtol * rms(z)`` (RMS over the sample's elements) on its own,
    is then frozen (its value never changes again), and gets its own status and stats. A
    sample's result does not depend on its batch-mates (up to float reduction order).

    Arguments:
        f: the map. Called as ``f(z, x)`` with ``z`` of shape (rows, ...) and ``x`` holding
            the same rows (a tensor, or a tuple of tensors with the same structure as given);
            called as ``f(z)`` when ``x`` is None (convenient for closures, e.g. the linear
            adjoint map of an implicit backward pass). Must return a tensor of z's shape and
            dtype, each row depending on that row of z and x only.
        z0: (batch, ...) floating tensor, the first iterate; or a tuple / list of such
            tensors (a multi-scale state: each slot with the batch in dim 0 and its own
            shape, one dtype and device for all). Then f receives and returns the same
            structure, ``value`` has it, and each sample's test is one RMS over all of its
            elements in every slot (the state is packed into one (batch, n) tensor inside).
        x: None, a tensor or a tuple of tensors, each with the batch in dim 0.
        solver: a solver object: Picard, Anderson, Broyden, NewtonKrylov or SteadyState;
            or Captured(Picard() or Anderson()) to run k steps at a time as one
            torch.compile'd region (fixed shapes; see `Captured`).
        atol, rtol: tolerances (> 0) of the per-sample test above.
        max_steps: bound on solver steps (>= 1); samples still running get MAX_STEPS.
        throw: raise EquilibriaError (saying what to try) when any sample failed.
        compact: evaluate f only on the rows still running (index_select on z and every x,
            results scattered back). Pays off when samples converge at different steps and
            f is expensive.
        trace: record the residual of every sample at every step in ``Solution.trace``.
        divergence_factor: a sample whose residual exceeds this factor times its initial
            residual is stopped as DIVERGED (> 1).
        keep_steps: increasing step counts (each in [1, max_steps]) after which to keep
            every sample's current value (its best iterate so far; a sample that stopped
            earlier gives its final value) in ``stats["kept"]``, a list of (batch, ...)
            tensors, one per step count (for fixed-point correction losses).

    Returns:
        Solution with ``value`` (batch, ...) the converged iterate, or for failed samples the
        iterate with the lowest residual seen; ``status`` (batch,) Status codes (SUCCESS,
        MAX_STEPS, DIVERGED, NONFINITE); ``stats["residual"]`` (batch,) RMS of f(z) - z at
        the returned value, ``stats["n_steps"]`` and ``stats["nfe"]`` (batch,) int64 (nfe
        counts every evaluation of f, JVPs included, made on that sample, the initial one
        included), plus solver-specific stats (SteadyState: ``t``). With ``trace=True``,
        ``trace`` is a list of (batch,) residuals: entry 0 at z0, then one per step.

    Raises:
        TypeError: f, z0, x or solver of the wrong type (the message lists the solvers).
        ValueError: batch mismatch between z0 and x (naming which x), non-finite z0 or x,
            f returning the wrong shape or dtype, tolerances <= 0, max_steps < 1.
        EquilibriaError: with ``throw=True`` when a sample did not succeed.

    The loop is differentiable when autograd is enabled (nothing is detached except the
    residual bookkeeping), so backpropagating through ``value`` differentiates the solver's
    iterations (the DEQ "Unrolled" strategy); under ``torch.no_grad`` nothing is recorded.

    Under ``torch.autocast`` f runs in the autocast dtype and its output is cast back to
    z0's dtype, while the solver's own arithmetic runs with autocast off (a Gram matrix from a
    bfloat16 matmul would stall Anderson); see `equilibria._autocast`.

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """
    if not callable(f):
        raise TypeError(f"f must be callable f(z, x) -> z, got {type(f).__name__}.")
    structure = Structure.of("z0", z0)
    if structure is not None:
        # A structured state: solve on the packed (batch, n) state, hand back the structure.
        solution = fixed_point(
            structure.wrap(f), structure.flatten(z0), x, solver, atol=atol, rtol=rtol,
            max_steps=max_steps, throw=throw, compact=compact, trace=trace,
            divergence_factor=divergence_factor, keep_steps=keep_steps,
        )
        solution.value = structure.unflatten(solution.value)
        if "kept" in solution.stats:
            solution.stats["kept"] = [structure.unflatten(v) for v in solution.stats["kept"]]
        return solution
    check_batched_state("z0", z0)
    if not isinstance(solver, FixedPointSolver):
        raise TypeError(
            f"solver must be a solver object, got {type(solver).__name__} {solver!r}; "
            f"choose one of {_solver_choices()}."
        )
    capture = None
    if isinstance(solver, Captured):
        capture, solver = solver, solver.solver
        for name, value in (("trace", trace), ("keep_steps", keep_steps), ("compact", compact)):
            if value:
                raise ValueError(
                    f"{name} is not available with a Captured solver (its regions keep fixed "
                    f"shapes and record nothing per step); pass {capture.solver!r} instead."
                )
    atol, rtol = check_tolerances(atol, rtol)
    max_steps = check_positive_int("max_steps", max_steps)
    divergence_factor = check_positive("divergence_factor", divergence_factor)
    if divergence_factor <= 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor}; e.g. 1e3.")
    for name, flag in (("throw", throw), ("compact", compact), ("trace", trace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}.")
    if z0.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"z0 has dtype {z0.dtype}: the solvers keep their own arithmetic (norms, Gram "
            "matrices, least squares) in the state's dtype, which half precision cannot carry; "
            "pass z0.float() and run f in low precision under torch.autocast."
        )
    keep_steps = _check_keep_steps(keep_steps, max_steps)
    batch = z0.shape[0]
    x = _check_x(x, batch)
    if batch == 0:  # nothing to solve: f is not called (it may not accept an empty batch)
        empty = torch.zeros(0, dtype=torch.int64, device=z0.device)
        stats = {"residual": z0.new_zeros(0), "n_steps": empty, "nfe": empty.clone()}
        stats.update({key: z0.new_zeros(0) for key in solver.stat_keys})
        if keep_steps:
            stats["kept"] = [z0 for _ in keep_steps]
        return Solution(value=z0, status=empty.clone(), stats=stats,
                        trace=[z0.new_zeros(0)] if trace else None)
    # In-place solver updates need memory of their own (an expand()ed z0 shares it).
    z0 = z0.contiguous()

    fz0 = _bind(f, x)(z0)

    device = z0.device
    width = z0[0].numel()
    inverse_sqrt = 1.0 / math.sqrt(width) if width else 0.0
    # Bookkeeping tensors are built with as few ops as possible: each small op costs a few
    # microseconds, and at the benchmark's size (width 512, batch 256) the loop's share of
    # the time beside f is mostly their number.
    with torch.no_grad():
        residual0 = rms_norm(fz0 - z0)
        tolerance0 = rms_norm(z0).mul_(rtol).add_(atol)
        # A residual is a norm: >= 0, or +inf / NaN when f overflowed; NaN compares False.
        finite0 = residual0 < math.inf
        status = torch.full((batch,), int(Status.NONFINITE), dtype=torch.int64, device=device)
        status.masked_fill_(finite0, int(Status.MAX_STEPS))
        status.masked_fill_(finite0 & (residual0 <= tolerance0), int(Status.SUCCESS))
    # A row is running exactly while its status is MAX_STEPS: the loop gives a row one of
    # the three other statuses when it stops it.
    active = status == int(Status.MAX_STEPS)
    with deliberate_sync(device):
        n_active = int(active.sum())
    best_value = z0
    best_residual = residual0
    n_steps = torch.zeros(batch, dtype=torch.int64, device=device)
    nfe = torch.ones(batch, dtype=torch.int64, device=device)
    residual_now = residual0
    residual_trace = [residual0] if trace else None
    fast = _cheap_sync(device)
    check_every = 1 if fast else _CHECK_EVERY_WITHOUT_SYNC

    rows: torch.Tensor | None = None  # full-batch index of each state row; None = all rows
    x_rows = x
    state: State | None = None
    # Solver stats (SteadyState's "t") exist even when no sample needed a step (all zero).
    extra = {key: torch.zeros_like(residual0) for key in solver.stat_keys}
    if n_active:
        if compact and n_active < batch:
            with deliberate_sync(device):
                rows = active.nonzero().flatten()
            x_rows = _select_rows(x, rows)
            state = solver.init(_bind(f, x_rows, rows), z0.index_select(0, rows), fz0[rows])
        else:
            state = solver.init(_bind(f, x), z0, fz0)
        if solver.uses_tolerance:
            state["tolerance"] = _take(tolerance0, rows)
        for key in solver.stat_keys:
            extra[key] = _put(extra[key], rows, state[key].detach().to(residual0.dtype))

    # On CPU a host sync is free, so the common step (every row still running, every residual
    # improving, none finished) takes a path with no torch.where over the batch at all.
    all_running = state is not None and (rows is not None or n_active == batch)
    # The running rows among the state's (None: all of them).
    running_local = None if all_running or state is None else _take(active, rows)
    limit = divergence_factor * residual0  # a residual above it is DIVERGED
    kept: list[torch.Tensor] = []
    # Consecutive steps whose trial f was not finite, per row (solvers that reject steps).
    streak = None
    if state is not None and "nonfinite_trial" in state:
        streak = torch.zeros(batch, dtype=torch.int64, device=device)
    # The fused test (CPU, solvers that keep their norms): steps on which no sample stops and
    # every running one improves add to n_steps and nfe in bulk later (`pending`), and leave
    # the running rows' best residual in the solver's norms (`best_in_norms`) until a step
    # needs it: such a step costs the loop two ops beside the solver's norms.
    fused = None
    if fast and state is not None and not solver.stat_keys and streak is None:
        if solver.norm_layout(0) is not None:
            fused = FusedTest(atol, rtol, inverse_sqrt)
            fused.reset(running_local, _take(best_residual, rows))
    pending_steps = pending_nfe = 0
    best_in_norms: BestColumn | None = None
    # A Captured solver's regions start once the solver's history is full (fixed shapes);
    # when autograd records the solve (Unrolled), every step runs eagerly.
    if capture is not None and (fz0.requires_grad or z0.requires_grad):
        capture = None
    eager_steps = max_steps if capture is None else min(max_steps, solver.warmup)
    finished = False
    # The map on the state's rows: made again only when compaction changes them.
    bound = _bind(f, x_rows, rows)
    for step_index in range(eager_steps if state is not None else 0):
        state, step_nfe = solver.step(bound, state, step_index)
        z, fz = state["z"], state["fz"]
        layout = solver.norm_layout(step_index) if fused is not None else None
        checked = False  # whether the fused test ran on this step's norms
        if layout is not None and step_nfe.__class__ is int:
            checked = True
            norms = state["norms"]
            use_previous = best_in_norms is not None and layout.previous is not None
            if fused.passes(norms, layout, use_previous):
                # No sample stops this step and every running one improved.
                if running_local is None:
                    best_value = z if rows is None else best_value.index_copy(0, rows, z)
                else:
                    keep = expand_as_batch(running_local, z)
                    best_value = _put(best_value, rows,
                                      torch.where(keep, z, _take(best_value, rows)))
                best_in_norms = fused.best_column(layout)
                if layout.previous is None:  # the solver will not keep it: store it now
                    best_residual = _put(best_residual, rows, fused.merge(
                        best_in_norms.read(norms, inverse_sqrt, residual0.dtype), running_local,
                        _take(best_residual, rows)))
                    best_in_norms = None
                pending_steps += 1
                pending_nfe += step_nfe
                if residual_trace is not None:
                    residual_now = _put(residual_now, rows, fused.merge(
                        fused.residual(norms, layout).to(residual0.dtype), running_local,
                        _take(residual_now, rows)))
                    residual_trace.append(residual_now)
                if keep_steps and step_index + 1 in keep_steps:
                    kept.append(_snapshot(best_value))
                continue
        if best_in_norms is not None:
            # The previous step's residual column (the best of every running row): the
            # solver's layout keeps it as this step's `previous`.
            best_residual = _put(best_residual, rows, fused.merge(
                best_in_norms.read(state["norms"], inverse_sqrt, residual0.dtype),
                running_local, _take(best_residual, rows)))
            best_in_norms = None
        if pending_steps:
            n_steps, nfe = add_pending(n_steps, nfe, rows, running_local, pending_steps,
                                        pending_nfe)
            pending_steps = pending_nfe = 0
        with torch.no_grad():
            # A solver may hand over its norms, the RMS residual, or f(z) - z, already
            # computed. On CPU the plain float32 norms are used and an overflowed one (a
            # state near 1e19) is recomputed on the slow path below; elsewhere row_norm
            # accumulates in float64 (no host sync).
            norm = _plain_norm if fast else row_norm
            layout = solver.norm_layout(step_index)
            if layout is not None:
                residual = residual_from(state["norms"], layout, inverse_sqrt, z.dtype)
            else:
                residual = state.get("residual")
            if residual is None:
                g = state.get("g")
                g = fz - z if g is None else g
                residual = norm(g.reshape(z.shape[0], -1)) * inverse_sqrt
            if layout is not None and fast:
                tolerance = state["norms"][:, layout.z]
            else:
                tolerance = norm(z.reshape(z.shape[0], -1))
            tolerance = tolerance.mul(rtol * inverse_sqrt).add_(atol)
            if tolerance.dtype != z.dtype:
                tolerance = tolerance.to(z.dtype)
        # A solver that rejects trial steps (line searches, step-size control) hides an f
        # that returns NaN: it reports the rows whose trial was not finite.
        bad_trial = state.get("nonfinite_trial")
        # Solvers with an inner iteration (Newton-Krylov forcing terms) use the target to
        # avoid solving the linear systems more accurately than the answer needs.
        if solver.uses_tolerance:
            state["tolerance"] = tolerance
        if fast and all_running and fused is None:
            # NaN compares False, so a non-finite residual leaves the fast path too.
            going = (residual > tolerance) & (residual <= _take(limit, rows))
            if bad_trial is not None:
                going = going & ~bad_trial
            improved = residual < _take(best_residual, rows)
            all_improved = bool((going & improved).all())
            if all_improved or bool(going.all()):
                # No sample stops this step: only the best iterate and the counters change.
                if all_improved:
                    best_value = _put(best_value, rows, z)
                    best_residual = _put(best_residual, rows, residual)
                else:
                    keep = expand_as_batch(improved, z)
                    best_value = _put(
                        best_value, rows, torch.where(keep, z, _take(best_value, rows))
                    )
                    best_residual = _put(
                        best_residual,
                        rows,
                        torch.where(improved, residual, _take(best_residual, rows)),
                    )
                n_steps = _put(n_steps, rows, _take(n_steps, rows) + 1)
                nfe = _put(nfe, rows, _take(nfe, rows) + step_nfe)
                if streak is not None:
                    streak = _put(streak, rows, torch.zeros_like(residual, dtype=torch.int64))
                for key in solver.stat_keys:
                    value = state[key].detach().to(residual0.dtype)
                    extra[key] = _put(extra[key], rows, value)
                if residual_trace is not None:
                    residual_now = _put(residual_now, rows, residual)
                    residual_trace.append(residual_now)
                if keep_steps and step_index + 1 in keep_steps:
                    kept.append(_snapshot(best_value))
                continue
        running = _take(active, rows)
        finite = checked and fused.finite()  # then every running row's norms are finite
        if fast and (out_of_range(residual) or out_of_range(tolerance)):
            # norms that over- or underflowed in float32 (a 1e19 state, a 1e-30 residual):
            # recompute them scaled, and test them with the full mask below
            finite = False
            with torch.no_grad():
                residual = row_norm((fz - z).reshape(z.shape[0], -1)) * inverse_sqrt
                tolerance = row_norm(z.reshape(z.shape[0], -1)).mul_(rtol * inverse_sqrt)
                tolerance = tolerance.add_(atol)
            if solver.uses_tolerance:
                state["tolerance"] = tolerance
        ok = None if finite else running & (residual < math.inf)  # running and finite
        if bad_trial is not None:
            streak_rows = torch.where(bad_trial, _take(streak, rows) + 1, 0)
            streak = _put(streak, rows, streak_rows)
            ok = (running if ok is None else ok) & (streak_rows < _NONFINITE_STREAK)
        best_local, best_residual_local, step_status = stop_or_improve(
            running, ok, residual, tolerance, _take(limit, rows), z, _take(best_value, rows),
            _take(best_residual, rows), _take(status, rows))
        best_value = _put(best_value, rows, best_local)
        best_residual = _put(best_residual, rows, best_residual_local)
        status = _put(status, rows, step_status)
        n_steps = _put(n_steps, rows, _take(n_steps, rows) + running)
        one = isinstance(step_nfe, int) and step_nfe == 1
        nfe = _put(nfe, rows, _take(nfe, rows) + (running if one else running * step_nfe))
        for key in solver.stat_keys:
            value = state[key].detach().to(residual0.dtype)
            merged = torch.where(running, value, _take(extra[key], rows))
            extra[key] = _put(extra[key], rows, merged)
        still_running = step_status == int(Status.MAX_STEPS)
        active = _put(active, rows, still_running)
        if residual_trace is not None:
            residual_now = _put(
                residual_now, rows, torch.where(running, residual, _take(residual_now, rows))
            )
            residual_trace.append(residual_now)
        if keep_steps and step_index + 1 in keep_steps:
            kept.append(_snapshot(best_value))

        if (step_index + 1) % check_every == 0 or step_index + 1 == max_steps:
            with deliberate_sync(device):
                n_still = int(still_running.sum())
            if n_still == 0:
                finished = True
                break
            n_rows = still_running.shape[0]
            all_running = n_still == n_rows
            running_local = None if all_running else still_running
            # Compacting copies the whole solver state (e.g. Anderson's history), so do it
            # once enough rows have finished to pay for the copy.
            if compact and n_rows - n_still >= max(1, n_rows // 8):
                with deliberate_sync(device):
                    keep = still_running.nonzero().flatten()
                rows = keep if rows is None else rows.index_select(0, keep)
                x_rows = _select_rows(x, rows)
                bound = _bind(f, x_rows, rows)
                state = {key: value.index_select(0, keep) for key, value in state.items()}
                all_running, running_local = True, None
            if fused is not None:
                fused.reset(running_local, _take(best_residual, rows))

    if best_in_norms is not None:  # the last step improved every running row
        best_residual = _put(best_residual, rows, fused.merge(
            best_in_norms.read(state["norms"], inverse_sqrt, residual0.dtype),
            running_local, _take(best_residual, rows)))
    if pending_steps:
        n_steps, nfe = add_pending(n_steps, nfe, rows, running_local, pending_steps,
                                    pending_nfe)
    if capture is not None and state is not None and not finished and eager_steps < max_steps:
        book = {"best_value": best_value, "best_residual": best_residual, "status": status,
                "n_steps": n_steps, "nfe": nfe, "limit": limit}
        state, book = capture.run(f, x, state, book, eager_steps, max_steps, atol, rtol,
                                  inverse_sqrt)
        best_value, best_residual, status = book["best_value"], book["best_residual"], \
            book["status"]
        n_steps, nfe = book["n_steps"], book["nfe"]

    if streak is not None:
        # Still rejecting non-finite trials at the step bound: f is the problem, not max_steps.
        stuck = (status == int(Status.MAX_STEPS)) & (streak > 0)
        status = status.masked_fill(stuck, int(Status.NONFINITE))
    stats: dict[str, Any] = {"residual": best_residual, "n_steps": n_steps, "nfe": nfe}
    stats.update(extra)
    if keep_steps:
        # Steps the loop did not reach (every sample stopped before): the final values.
        stats["kept"] = kept + [best_value] * (len(keep_steps) - len(kept))
    solution = Solution(value=best_value, status=status, stats=stats, trace=residual_trace)
    if throw:
        solution.raise_if_failed("fixed_point")
    return solution
