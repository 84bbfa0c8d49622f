"""fixed_point(): the one loop that drives every fixed-point solver.

The loop owns everything that is the same for all solvers: input checks, the per-sample
tolerance test, freezing converged samples, best-iterate tracking, divergence detection, the
step bound, compaction of converged rows and the residual trace. A solver only proposes the
next iterate (see `_solver.FixedPointSolver`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._autocast import outside_autocast
from .._checks import check_batched_state
from .._solution import Solution
from .._structure import Structure
from ._anderson import Anderson
from ._book import Book
from ._inputs import _bind, _check_x, check_options
from ._solver import FixedPointSolver

__all__ = ["fixed_point"]


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
    solver, capture, atol, rtol, max_steps, divergence_factor, keep_steps = check_options(
        z0, solver, atol, rtol, max_steps, throw, compact, trace, divergence_factor, keep_steps)
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
    book = Book(f, x, z0, fz0, solver, atol=atol, rtol=rtol, max_steps=max_steps,
                compact=compact, trace=trace, divergence_factor=divergence_factor,
                keep_steps=keep_steps)
    state = book.start()
    # A Captured solver's regions start once the solver's history is full (fixed shapes);
    # when autograd records the solve (Unrolled), every step runs eagerly.
    if capture is not None and (fz0.requires_grad or z0.requires_grad):
        capture = None
    eager_steps = max_steps if capture is None else min(max_steps, solver.warmup)
    finished = False
    for step_index in range(eager_steps if state is not None else 0):
        state, step_nfe = solver.step(book.bound, state, step_index)
        state, finished = book.step(state, step_nfe, step_index)
        if finished:
            break
    book.flush(state)
    if capture is not None and state is not None and not finished and eager_steps < max_steps:
        names = ("best_value", "best_residual", "status", "n_steps", "nfe", "limit")
        record = {name: getattr(book, name) for name in names}
        state, record = capture.run(f, x, state, record, eager_steps, max_steps, atol, rtol,
                                    book.inverse_sqrt)
        for name in names[:-1]:
            setattr(book, name, record[name])
    return book.finish(throw)
