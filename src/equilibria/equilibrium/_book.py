"""The loop's per-sample record of a solve: tests, freezing, statuses, best iterate,
counters, trace, kept values and compaction, one step at a time (`Book.step`).

`fixed_point` (`_loop.py`) checks its inputs and drives the solver; everything it decides
about a sample after each step is here. Every decision is made by masks over the batch; on
CPU the common step (no sample stops, every running one improves) is recognised by the
solver's norms alone (`FusedTest`) and costs two ops beside them (none for a few rows,
whose test runs on the host from one read of the norms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._checks import deliberate_sync, out_of_range, rms_norm, row_norm
from .._solution import Solution, Status
from . import _fused
from ._fused import BestColumn, FusedTest, _put, _take, add_pending, residual_from, stop_or_improve
from ._inputs import _bind, _select_rows
from ._solver import FixedPointSolver, State, expand_as_batch

__all__ = ["Book"]

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


def _snapshot(value: torch.Tensor) -> torch.Tensor:
    """A kept value: the recorded graph itself when autograd is recording (Unrolled), else a
    copy that later in-place solver updates cannot touch."""
    return value if value.requires_grad else value.detach().clone()


class Book:
    """Everything the loop knows about each sample between steps (full-batch tensors), the
    state's rows (`rows`: their full-batch index, None for all rows in order) and the map
    on them (`bound`)."""

    def __init__(self, f: Callable, x: Any, z0: torch.Tensor, fz0: torch.Tensor,
                 solver: FixedPointSolver, *, atol: float, rtol: float, max_steps: int,
                 compact: bool, trace: bool, divergence_factor: float,
                 keep_steps: tuple[int, ...]) -> None:
        self.f, self.x, self.solver = f, x, solver
        self.atol, self.rtol, self.max_steps, self.compact = atol, rtol, max_steps, compact
        self.keep_steps = keep_steps
        batch = self.batch = z0.shape[0]
        device = self.device = z0.device
        width = z0[0].numel()
        self.inverse_sqrt = 1.0 / math.sqrt(width) if width else 0.0
        # Bookkeeping tensors are built with as few ops as possible: each small op costs a
        # few microseconds, and at the benchmark's size (width 512, batch 256) the loop's
        # share of the time beside f is mostly their number.
        with torch.no_grad():
            residual0 = rms_norm(fz0 - z0)
            self.tolerance0 = rms_norm(z0).mul_(rtol).add_(atol)
            if device.type == "cpu" and batch <= _fused.HOST_STATUS_ROWS:
                # A few rows: the statuses from the values (one read, one tensor sent).
                codes = [_fused.initial_status(r, t) for r, t in zip(residual0.tolist(),
                                                                self.tolerance0.tolist())]
                status = torch.tensor(codes, dtype=torch.int64, device=device)
                n_active = codes.count(int(Status.MAX_STEPS))
            else:
                # A residual is >= 0, or +inf / NaN when f overflowed; NaN compares False.
                finite0 = residual0 < math.inf
                status = torch.full((batch,), int(Status.NONFINITE), dtype=torch.int64,
                                    device=device)
                status.masked_fill_(finite0, int(Status.MAX_STEPS))
                status.masked_fill_(finite0 & (residual0 <= self.tolerance0),
                                    int(Status.SUCCESS))
                n_active = None
        self.residual0, self.status = residual0, status
        # A row is running exactly while its status is MAX_STEPS: the loop gives a row one
        # of the three other statuses when it stops it.
        self.active = status == int(Status.MAX_STEPS)
        if n_active is None:
            with deliberate_sync(device):
                n_active = int(self.active.sum())
        self.n_active = n_active
        self.z0, self.fz0 = z0, fz0
        self.best_value = z0
        self.best_residual = residual0
        self.n_steps = torch.zeros(batch, dtype=torch.int64, device=device)
        self.nfe = torch.ones(batch, dtype=torch.int64, device=device)
        self.residual_now = residual0
        self.residual_trace = [residual0] if trace else None
        self.fast = _cheap_sync(device)
        self.check_every = 1 if self.fast else _CHECK_EVERY_WITHOUT_SYNC
        self.rows: torch.Tensor | None = None
        self.x_rows = x
        # Solver stats (SteadyState's "t") exist even when no sample needed a step (zero).
        self.extra = {key: torch.zeros_like(residual0) for key in solver.stat_keys}
        self.limit = divergence_factor * residual0  # a residual above it is DIVERGED
        self.kept: list[torch.Tensor] = []
        self.streak: torch.Tensor | None = None
        # Whether a state row's streak may be non-zero (else a step need not clear it).
        self.streak_dirty = False
        self.fused: FusedTest | None = None
        self.pending_steps = self.pending_nfe = 0
        self.best_in_norms: BestColumn | None = None
        self.all_running = False
        self.running_local: torch.Tensor | None = None
        self.bound = _bind(f, x)

    def start(self) -> State | None:
        """The solver's first state (None when no sample needs a step), on the running rows
        only with compaction."""
        solver, batch, rows = self.solver, self.batch, None
        state: State | None = None
        if self.n_active:
            if self.compact and self.n_active < batch:
                with deliberate_sync(self.device):
                    rows = self.active.nonzero().flatten()
                self.x_rows = _select_rows(self.x, rows)
                state = solver.init(_bind(self.f, self.x_rows, rows),
                                    self.z0.index_select(0, rows), self.fz0[rows])
            else:
                state = solver.init(self.bound, self.z0, self.fz0)
            if solver.uses_tolerance:
                state["tolerance"] = _take(self.tolerance0, rows)
            for key in solver.stat_keys:
                self.extra[key] = _put(self.extra[key], rows,
                                       state[key].detach().to(self.residual0.dtype))
        self.rows = rows
        # On CPU a host sync is free, so the common step (every row still running, every
        # residual improving, none finished) takes a path with no torch.where at all.
        self.all_running = state is not None and (rows is not None or self.n_active == batch)
        # The running rows among the state's (None: all of them).
        self.running_local = (None if self.all_running or state is None
                              else _take(self.active, rows))
        # Consecutive steps whose trial f was not finite, per row (solvers that reject steps).
        if state is not None and "nonfinite_trial" in state:
            self.streak = torch.zeros(batch, dtype=torch.int64, device=self.device)
        # The fused test (CPU, solvers that keep their norms): steps on which no sample stops
        # and every running one improves add to n_steps and nfe in bulk later (`pending`),
        # and leave the running rows' best residual in the solver's norms (`best_in_norms`)
        # until a step needs it: such a step costs the loop two ops beside the solver's norms.
        # (A solver that may reject non-finite trials leaves "nonfinite_trial" out of the
        # state on a step on which it rejected none: only such steps take the fused test.)
        if (self.fast and state is not None and not solver.stat_keys
                and solver.norm_layout(0) is not None):
            self.fused = FusedTest(self.atol, self.rtol, self.inverse_sqrt)
            self.fused.reset(self.running_local, _take(self.best_residual, rows))
        # The map on the state's rows: made again only when compaction changes them.
        self.bound = _bind(self.f, self.x_rows, rows)
        return state

    def step(self, state: State, step_nfe: Any, step_index: int) -> tuple[State, bool]:
        """Record the solver's step `step_index` (its new state and evaluations); returns the
        state (compacted, when compaction dropped finished rows) and whether every sample
        has stopped."""
        fused = self.fused
        layout = self.solver.norm_layout(step_index) if fused is not None else None
        checked = False  # whether the fused test ran on this step's norms
        if layout is not None and step_nfe.__class__ is int and "nonfinite_trial" not in state:
            checked = True
            norms = state["norms"]
            use_previous = self.best_in_norms is not None and layout.previous is not None
            if fused.passes(norms, layout, use_previous):
                # No sample stops this step and every running one improved.
                self._common(state["z"], norms, layout, step_nfe, step_index)
                return state, False
        self.flush(state)
        still_running = self._masked(state, step_nfe, step_index, checked)
        if still_running is None:
            return state, False
        if (step_index + 1) % self.check_every == 0 or step_index + 1 == self.max_steps:
            return self._check(state, still_running)
        return state, False

    def _common(self, z: torch.Tensor, norms: torch.Tensor, layout: Any, step_nfe: int,
                step_index: int) -> None:
        """A step the fused test passed: only the best iterate and the counters change."""
        fused, rows, running_local = self.fused, self.rows, self.running_local
        if running_local is None:
            self.best_value = z if rows is None else self.best_value.index_copy(0, rows, z)
        else:
            keep = expand_as_batch(running_local, z)
            self.best_value = _put(self.best_value, rows,
                                   torch.where(keep, z, _take(self.best_value, rows)))
        self.best_in_norms = fused.best_column(layout)
        dtype = self.residual0.dtype
        if layout.previous is None:  # the solver will not keep it: store it now
            best = fused.merge(self.best_in_norms.read(norms, self.inverse_sqrt, dtype),
                               running_local, _take(self.best_residual, rows))
            self.best_residual = _put(self.best_residual, rows, best)
            self.best_in_norms = None
            # the next step's test compares against this best (its bias holds the best when
            # no column of the norms does): without this it kept the best of the last slow
            # step, and a worse iterate could replace the best one
            fused.reset(running_local, best)
        if self.streak_dirty:  # every running row's trial was finite
            self._clear_streak()
        self.pending_steps += 1
        self.pending_nfe += step_nfe
        if self.residual_trace is not None:
            self.residual_now = _put(self.residual_now, rows, fused.merge(
                fused.residual(norms, layout).to(dtype), running_local,
                _take(self.residual_now, rows)))
            self.residual_trace.append(self.residual_now)
        if self.keep_steps and step_index + 1 in self.keep_steps:
            self.kept.append(_snapshot(self.best_value))

    def flush(self, state: State | None) -> None:
        """Write back what common steps left pending: the best residual kept in the
        solver's norms (the previous step's residual column: the solver's layout keeps it
        as this step's `previous`) and their step and evaluation counts."""
        rows = self.rows
        if self.best_in_norms is not None:
            self.best_residual = _put(self.best_residual, rows, self.fused.merge(
                self.best_in_norms.read(state["norms"], self.inverse_sqrt,
                                        self.residual0.dtype),
                self.running_local, _take(self.best_residual, rows)))
            self.best_in_norms = None
        if self.pending_steps:
            self.n_steps, self.nfe = add_pending(self.n_steps, self.nfe, rows,
                                                 self.running_local, self.pending_steps,
                                                 self.pending_nfe)
            self.pending_steps = self.pending_nfe = 0

    def _residual_and_tolerance(self, state: State, step_index: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each state row's residual and tolerance after a step. A solver may hand over its
        norms, the RMS residual, or f(z) - z, already computed. On CPU the plain float32
        norms are used and an overflowed one (a state near 1e19) is recomputed on the masked
        path; elsewhere row_norm accumulates in float64 (no host sync)."""
        z, inverse_sqrt = state["z"], self.inverse_sqrt
        with torch.no_grad():
            norm = _plain_norm if self.fast else row_norm
            layout = self.solver.norm_layout(step_index)
            if layout is not None:
                residual = residual_from(state["norms"], layout, inverse_sqrt, z.dtype)
            else:
                residual = state.get("residual")
            if residual is None:
                g = state.get("g")
                g = state["fz"] - z if g is None else g
                residual = norm(g.reshape(z.shape[0], -1)) * inverse_sqrt
            if layout is not None and self.fast:
                tolerance = state["norms"][:, layout.z]
            else:
                tolerance = norm(z.reshape(z.shape[0], -1))
            tolerance = tolerance.mul(self.rtol * inverse_sqrt).add_(self.atol)
            if tolerance.dtype != z.dtype:
                tolerance = tolerance.to(z.dtype)
        return residual, tolerance

    def _masked(self, state: State, step_nfe: Any, step_index: int, checked: bool
                ) -> torch.Tensor | None:
        """A step's decisions for every row of the state, by masks; returns the state rows
        still running after it (None: every row, and nothing to check)."""
        solver, rows, z, fz = self.solver, self.rows, state["z"], state["fz"]
        dtype = self.residual0.dtype
        residual, tolerance = self._residual_and_tolerance(state, step_index)
        # A solver that rejects trial steps (line searches, step-size control) hides an f
        # that returns NaN: it reports the rows whose trial was not finite.
        bad_trial = state.get("nonfinite_trial")
        # Solvers with an inner iteration (Newton-Krylov forcing terms) use the target to
        # avoid solving the linear systems more accurately than the answer needs.
        if solver.uses_tolerance:
            state["tolerance"] = tolerance
        if self.fast and self.all_running and self.fused is None:
            # NaN compares False, so a non-finite residual leaves the fast path too.
            going = (residual > tolerance) & (residual <= _take(self.limit, rows))
            if bad_trial is not None:
                going = going & ~bad_trial
            improved = residual < _take(self.best_residual, rows)
            all_improved = bool((going & improved).all())
            if all_improved or bool(going.all()):
                # No sample stops this step: only the best iterate and the counters change.
                if all_improved:
                    self.best_value = _put(self.best_value, rows, z)
                    self.best_residual = _put(self.best_residual, rows, residual)
                else:
                    keep = expand_as_batch(improved, z)
                    self.best_value = _put(self.best_value, rows, torch.where(
                        keep, z, _take(self.best_value, rows)))
                    self.best_residual = _put(self.best_residual, rows, torch.where(
                        improved, residual, _take(self.best_residual, rows)))
                self.n_steps = _put(self.n_steps, rows, _take(self.n_steps, rows) + 1)
                self.nfe = _put(self.nfe, rows, _take(self.nfe, rows) + step_nfe)
                if self.streak is not None:
                    self.streak = _put(self.streak, rows,
                                       torch.zeros_like(residual, dtype=torch.int64))
                    self.streak_dirty = False
                for key in solver.stat_keys:
                    self.extra[key] = _put(self.extra[key], rows,
                                           state[key].detach().to(dtype))
                self._after_step(residual, None, step_index)
                return None  # nothing stopped: no check needed
        running = _take(self.active, rows)
        finite = checked and self.fused.finite()  # then every running row's norms are finite
        if self.fast and (out_of_range(residual) or out_of_range(tolerance)):
            # norms that over- or underflowed in float32 (a 1e19 state, a 1e-30 residual):
            # recompute them scaled, and test them with the full mask below
            finite = False
            with torch.no_grad():
                residual = row_norm((fz - z).reshape(z.shape[0], -1)) * self.inverse_sqrt
                tolerance = row_norm(z.reshape(z.shape[0], -1)).mul_(
                    self.rtol * self.inverse_sqrt)
                tolerance = tolerance.add_(self.atol)
            if solver.uses_tolerance:
                state["tolerance"] = tolerance
        ok = None if finite else running & (residual < math.inf)  # running and finite
        if bad_trial is not None:
            streak_rows = torch.where(bad_trial, _take(self.streak, rows) + 1, 0)
            self.streak = _put(self.streak, rows, streak_rows)
            self.streak_dirty = True
            ok = (running if ok is None else ok) & (streak_rows < _NONFINITE_STREAK)
        elif self.streak_dirty:
            self._clear_streak()
        best_local, best_residual_local, step_status = stop_or_improve(
            running, ok, residual, tolerance, _take(self.limit, rows), z,
            _take(self.best_value, rows), _take(self.best_residual, rows),
            _take(self.status, rows))
        self.best_value = _put(self.best_value, rows, best_local)
        self.best_residual = _put(self.best_residual, rows, best_residual_local)
        self.status = _put(self.status, rows, step_status)
        self.n_steps = _put(self.n_steps, rows, _take(self.n_steps, rows) + running)
        one = isinstance(step_nfe, int) and step_nfe == 1
        self.nfe = _put(self.nfe, rows,
                        _take(self.nfe, rows) + (running if one else running * step_nfe))
        for key in solver.stat_keys:
            value = state[key].detach().to(dtype)
            merged = torch.where(running, value, _take(self.extra[key], rows))
            self.extra[key] = _put(self.extra[key], rows, merged)
        still_running = step_status == int(Status.MAX_STEPS)
        self.active = _put(self.active, rows, still_running)
        self._after_step(residual, running, step_index)
        return still_running

    def _clear_streak(self) -> None:
        """A step without a non-finite trial: the state rows' streaks end."""
        self.streak = _put(self.streak, self.rows,
                           torch.zeros_like(_take(self.streak, self.rows)))
        self.streak_dirty = False

    def _after_step(self, residual: torch.Tensor, running: torch.Tensor | None,
                    step_index: int) -> None:
        """The trace entry (running rows' new residuals) and the kept value of a step."""
        if self.residual_trace is not None:
            rows = self.rows
            if running is not None:
                residual = torch.where(running, residual, _take(self.residual_now, rows))
            self.residual_now = _put(self.residual_now, rows, residual)
            self.residual_trace.append(self.residual_now)
        if self.keep_steps and step_index + 1 in self.keep_steps:
            self.kept.append(_snapshot(self.best_value))

    def _check(self, state: State, still_running: torch.Tensor) -> tuple[State, bool]:
        """The host's read of how many rows still run (every step on CPU, every few on
        CUDA): stop when none does, else note which, and compact when enough have finished
        to pay for copying the solver's state."""
        with deliberate_sync(self.device):
            n_still = int(still_running.sum())
        if n_still == 0:
            return state, True
        n_rows = still_running.shape[0]
        self.all_running = n_still == n_rows
        self.running_local = None if self.all_running else still_running
        # Compacting copies the whole solver state (e.g. Anderson's history), so do it once
        # enough rows have finished to pay for the copy.
        if self.compact and n_rows - n_still >= max(1, n_rows // 8):
            with deliberate_sync(self.device):
                keep = still_running.nonzero().flatten()
            rows = self.rows = keep if self.rows is None else self.rows.index_select(0, keep)
            self.x_rows = _select_rows(self.x, rows)
            self.bound = _bind(self.f, self.x_rows, rows)
            state = {key: value.index_select(0, keep) for key, value in state.items()}
            self.all_running, self.running_local = True, None
        if self.fused is not None:
            self.fused.reset(self.running_local, _take(self.best_residual, self.rows))
        return state, False

    def finish(self, throw: bool) -> Solution:
        """The Solution (after `flush`): NONFINITE for rows still rejecting non-finite
        trials at the step bound, the kept values of steps never reached."""
        status = self.status
        if self.streak is not None:
            # Still rejecting non-finite trials at the step bound: f is the problem, not
            # max_steps.
            stuck = (status == int(Status.MAX_STEPS)) & (self.streak > 0)
            status = status.masked_fill(stuck, int(Status.NONFINITE))
        stats: dict[str, Any] = {"residual": self.best_residual, "n_steps": self.n_steps,
                                 "nfe": self.nfe}
        stats.update(self.extra)
        if self.keep_steps:
            # Steps the loop did not reach (every sample stopped before): the final values.
            stats["kept"] = self.kept + [self.best_value] * (len(self.keep_steps)
                                                              - len(self.kept))
        solution = Solution(value=self.best_value, status=status, stats=stats,
                            trace=self.residual_trace)
        if throw:
            solution.raise_if_failed("fixed_point")
        return solution
