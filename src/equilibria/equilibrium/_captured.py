"""Captured: run a solver's steps as compiled regions, the host checking every k steps."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import check_positive_int, deliberate_sync, row_norm
from .._context import rows_scope
from .._solution import Status
from ._anderson import Anderson
from ._fused import residual_from, stop_or_improve
from ._solver import FixedPointSolver, State

__all__ = ["Captured"]


@dataclass(frozen=True)
class Captured(FixedPointSolver):
    """Run `solver` k steps at a time as one `torch.compile`d region (opt-in).

    Eager PyTorch launches every small op of a step on its own: on a GPU each is a kernel
    launch, at batch 1 each costs more than its arithmetic. Here, once the solver's history
    is full (Anderson: after m - 1 steps, run eagerly), `every` steps of the solver and of
    the loop's per-sample bookkeeping (tests, freezing, statuses, best iterate, divergence)
    are traced into one region; the host reads "is every sample done?" only between
    regions. Fixed shapes: the region is compiled once per (solver, f, every, tolerances,
    shapes) and reused by later calls with the same f object.

    The results are those of the eager loop with the same solver (statuses, steps, nfe,
    best iterate, residuals): steps past a sample's stop are masked exactly as there; a
    region may evaluate f on the whole batch up to `every` - 1 times after the last sample
    stopped (not counted in nfe). With backend "aot_eager" they agree bit for bit; with
    "inductor" up to the rounding of fused arithmetic.

    Arguments:
        solver: Picard or Anderson (a solver whose step depends on the step count only
            through its period).
        every: steps per region (>= 1; rounded up to a multiple of the solver's period,
            e.g. Anderson's m).
        backend, mode: passed to `torch.compile` ("inductor"; mode "reduce-overhead" adds
            CUDA graphs on a GPU).

    Raises:
        TypeError: a solver that cannot be captured; ValueError: every < 1. `fixed_point`
        raises ValueError for trace, keep_steps or compact with a Captured solver. When
        autograd records the solve (the Unrolled backward), the steps run eagerly.

    `compile_seconds` reports the wall time spent in first calls of the compiled region
    (tracing and compiling included), summed over the compilations made so far.
    """

    solver: FixedPointSolver = field(default_factory=Anderson)
    every: int = 10
    backend: str = "inductor"
    mode: str | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False,
                         hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.solver, FixedPointSolver) or isinstance(self.solver, Captured):
            raise TypeError(f"Captured(solver=...) takes a solver object, got {self.solver!r}.")
        if not self.solver.period or self.solver.norm_layout(0) is None:
            raise TypeError(
                f"{type(self.solver).__name__} cannot be captured (its step depends on "
                "the data through host reads); use eq.Anderson() or eq.Picard()."
            )
        check_positive_int("every", self.every)

    @property
    def stat_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.solver.stat_keys

    @property
    def compile_seconds(self) -> float:
        return self._cache.get("compile_seconds", 0.0)

    def steps_per_region(self) -> int:
        period = self.solver.period
        return -(-self.every // period) * period

    def run(self, f: Any, x: Any, state: State, book: dict[str, torch.Tensor], start: int,
            max_steps: int, atol: float, rtol: float, inverse_sqrt: float
            ) -> tuple[State, dict[str, torch.Tensor]]:
        """Steps start, ..., until every sample stopped or max_steps, region by region.
        `book` holds the loop's full-batch best_value, best_residual, status, n_steps, nfe
        and limit; returns the new state and book."""
        compiled = self._cache.get("compiled")
        if compiled is None:
            compiled = torch.compile(_region, backend=self.backend, mode=self.mode,
                                     dynamic=False)
            self._cache["compiled"] = compiled
        steps = self.steps_per_region()
        step = start
        with rows_scope(None):
            while step < max_steps:
                device = book["status"].device
                with deliberate_sync(device):  # a host-to-device copy between regions
                    remaining = torch.tensor(max_steps - step, device=device)
                began = time.perf_counter()
                compiles = _compilations()
                # The state travels as a tuple: Dynamo's guards on a dict of another
                # solver's keys (one cache serves every region) fail to explain themselves.
                keys = tuple(state)
                values, book = compiled(self.solver, f, x, keys, tuple(state.values()), book,
                                        start, steps, remaining, atol, rtol, inverse_sqrt)
                state = dict(zip(keys, values))
                if _compilations() != compiles:
                    self._cache["compile_seconds"] = (
                        self.compile_seconds + time.perf_counter() - began)
                step += steps
                running = (book["status"] == int(Status.MAX_STEPS)).any()
                with deliberate_sync(running.device):
                    if not bool(running):
                        break
        return state, book


def _compilations() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].get(key, 0) for key in ("unique_graphs",))


def _region(solver: FixedPointSolver, f: Any, x: Any, keys: tuple[str, ...],
            values: tuple[torch.Tensor, ...], book: dict[str, torch.Tensor], first: int,
            steps: int, remaining: torch.Tensor, atol: float, rtol: float,
            inverse_sqrt: float) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """`steps` solver steps and the loop's masked bookkeeping of each (traced by Dynamo).

    `first` is the canonical step count of the region (the solver's step depends on it only
    modulo its period); step i is masked off when i >= remaining (past max_steps)."""

    def fn(z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        out = f(z) if x is None else f(z, x)
        if (not isinstance(out, torch.Tensor) or out.shape != z.shape
                or out.dtype != z.dtype or out.device != z.device):
            from ._inputs import _bad_output

            _bad_output(out, z)
        return out

    state = dict(zip(keys, values))
    for i in range(steps):
        state, step_nfe = solver.step(fn, state, first + i)
        book = _bookkeep(solver, state, book, first + i, remaining > i, step_nfe, atol, rtol,
                         inverse_sqrt)
    return tuple(state[key] for key in keys), book


def _bookkeep(solver: FixedPointSolver, state: State, book: dict[str, torch.Tensor],
              step_index: int, live: torch.Tensor, step_nfe: Any, atol: float, rtol: float,
              inverse_sqrt: float) -> dict[str, torch.Tensor]:
    """The eager loop's step decisions, by masks. The norms are the solver's, and those that
    overflowed float32 are recomputed with a float64 accumulator, as the eager loop does."""
    z, fz = state["z"], state["fz"]
    layout = solver.norm_layout(step_index)
    with torch.no_grad():
        norms = state["norms"]
        flat = z.reshape(z.shape[0], -1)
        residual = residual_from(norms, layout, inverse_sqrt, z.dtype)
        wide = row_norm(fz.reshape(flat.shape) - flat) * inverse_sqrt
        residual = torch.where(torch.isinf(residual), wide, residual)
        tolerance = norms[:, layout.z].to(z.dtype)
        tolerance = torch.where(torch.isinf(tolerance), row_norm(flat), tolerance)
        tolerance = tolerance.mul(rtol * inverse_sqrt).add_(atol)
        running = (book["status"] == int(Status.MAX_STEPS)) & live
        ok = running & (residual < math.inf)
        best_value, best_residual, status = stop_or_improve(
            running, ok, residual, tolerance, book["limit"], z, book["best_value"],
            book["best_residual"], book["status"])
    return {"best_value": best_value, "best_residual": best_residual, "status": status,
            "n_steps": book["n_steps"] + running, "nfe": book["nfe"] + running * step_nfe,
            "limit": book["limit"]}
