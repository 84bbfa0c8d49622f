"""Reversible: the coupled fixed-point iteration of RevDEQ and its exact, O(1)-memory backward.

Forward, per sample, from y_0 = z_0 (the DEQ's first iterate), with β in (0, 1):

    y_k = (1 − β) y_{k−1} + β f(z_{k−1}, x)
    z_k = (1 − β) z_{k−1} + β f(y_k, x)

The step inverts exactly (in exact arithmetic):

    z_{k−1} = (z_k − β f(y_k, x)) / (1 − β)
    y_{k−1} = (y_k − β f(z_{k−1}, x)) / (1 − β)

so the backward pass keeps only the last pair (y_N, z_N), rebuilds every earlier pair from it,
and backpropagates through each step as it goes: the exact gradient of the iterate computed
(the same numbers as autograd through the iteration), at memory constant in N. Each rebuild
needs f(y_k) and f(z_{k−1}); the backward evaluates them with a graph and takes one VJP
through each, so it costs 2 evaluations + 2 VJPs a step (the forward: 2 evaluations a step).

Rounding. Dividing by 1 − β amplifies rounding: the reverse map expands volume by
(1 − β)^−2 a step (the forward contracts it as much), so an error in the rebuilt pair grows by
1/(1 − β) to ρ/(1 − β)² a step for a convergent linearisation (ρ: the forward's convergence
factor), more for a trained cell with large Jacobians. Measured on the seed MNIST cell in
float32 at β = 0.8: a relative drift of 3e+8 after 20 steps (gradient error 2e-2). Three
defences, all on by default:
- the pair is held in float64 (`pair_dtype`); f still runs in the state's dtype (the pair is
  cast down before each call), so while the float64 drift stays below a float32 ulp the
  rebuilt inputs of f are bit-identical to the forward's (at β = 0.5 the halvings are exact
  in binary: no drift at all for ~25 steps);
- the pair is also stored every k steps (`checkpoint_every`, "auto": k from β) and the
  rebuild restarts from it, bounding the drift to k steps of amplification;
- at the bottom of each segment (a checkpoint, or the first iterate, which is known) the
  rebuilt pair is compared with the stored one; where a sample drifted by more than
  `rebuild_tolerance`, the segment is recomputed forwards from the stored pair (stable: the
  forward contracts) and its VJPs redone, so no gradient is taken at a drifted pair.
benchmarks/results/reversible.md has the measurements.

Reference: McCallum, Arora & Foster, "Reversible Deep Equilibrium Models", arXiv 2509.12917
(2025), §3 (the coupled iteration and its reverse).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import (
    check_batched_state,
    check_positive_int,
    check_tolerances,
    rms_norm,
)
from .._solution import Solution, Status
from ..equilibrium._inputs import _check_x
from ..equilibrium._solver import expand_as_batch
from ._reversible_reverse import evaluate, forward_step, reverse_pass

__all__ = ["Reversible"]

Fn = Callable[[torch.Tensor, Any], torch.Tensor]
Record = Callable[[dict[str, Any]], None]

# As fixed_point's default: a residual above this factor times the first one is DIVERGED.
_DIVERGENCE_FACTOR = 1e3
# On CUDA `bool(tensor)` waits for the device: ask "is every sample done?" every few steps
# only (frozen samples are exact regardless: they are masked with torch.where).
_CHECK_EVERY_WITHOUT_SYNC = 4


@dataclass(frozen=True)
class Reversible:
    """Reversible DEQ (RevDEQ): a coupled iteration that is its own solver, and whose exact
    gradient is obtained by running it backwards, at memory constant in the number of steps.

    Use it as the DEQ's backward strategy, with no solver (it iterates itself)::

        deq = eq.DEQ(cell, backward=eq.Reversible(beta=0.8), rtol=1e-4, max_steps=50)

    The DEQ's atol / rtol / max_steps / throw govern the forward iteration (see the module
    docstring for the maths), also under ``torch.no_grad``:

    - Tolerance test, per sample, on z after each coupled step (f(z_k) is computed anyway for
      the next step): RMS(f(z_k) − z_k) <= atol + rtol · RMS(z_k), the same test as every
      other DEQ solver (the paper's relative test ||f(z) − z|| / ||f(z)|| differs only in the
      scale). A passing sample is frozen at that step: its own stop step and step count.
    - max_steps bounds the coupled steps (2 evaluations of f each).
    - Statuses: SUCCESS, MAX_STEPS, DIVERGED (residual > 1e3 × the first one), NONFINITE (a
      step produced inf / NaN: that step is not taken, the sample keeps its last finite pair).
    - Best iterate: like every solver, the returned value is each sample's best z_k (lowest
      residual; for SUCCESS the last). The backward rebuilds from the last pair (exact
      reversal needs it) down to step 0, injecting the incoming gradient at the sample's best
      step, so the gradient is exact for the value returned, failed samples included.

    Per sample: each sample's tolerance test, stop step, status, step count, best step and
    reversal are its own (torch.where masks), so its result does not depend on its
    batch-mates, nor its gradient beyond rounding (amplified by the rebuild; a segment
    recomputed because a batch-mate drifted swaps rebuilt pairs for recomputed ones, which
    agree to within rebuild_tolerance). Tested to 1e-9 relative in float64.

    The returned tensor is z_best itself (not one more f step), differentiable w.r.t.
    f_module's parameters, x, and the first iterate z0 when it requires grad (e.g. a Skip
    DEQ's g(x): the exact gradient of the iterate includes its dependence on z0).

    Arguments:
        beta: β in (0, 1), the relaxation (default 0.8, as the paper's code). Larger β
            converges in fewer steps but amplifies rounding in the reverse pass more (by
            ≥ 1/(1 − β) a step: more checkpoints). Measured training the seed MNIST DEQ
            (benchmarks/results/reversible.md): 0.8 took 14 evaluations a sample forward and
            1.7x less time a step than 0.5 (28), at the same test accuracy; 0.9 was slower
            (more segments recomputed).
        checkpoint_every: "auto" (default), None or k >= 1: also keep the pair every k steps
            and restart the rebuild from it (memory O(steps / k) pairs; None: O(1)). "auto"
            takes the largest k whose amplification (1 − β)^(−2k) keeps the pair dtype's
            rounding below its square root: k = 13 at β = 0.5, 5 at 0.8 (float64 pair).
            None keeps memory flat; drifted stretches are then recomputed from the first
            iterate (training the seed MNIST DEQ at β = 0.8: the same median time a step,
            23 backward evaluations a sample instead of 14).
        pair_dtype: dtype in which the pair (y, z) is accumulated and rebuilt: torch.float64
            (default; f still computes in the state's dtype) or None for the state's dtype
            (drifts sooner in float32: more segments get recomputed).
        rebuild_tolerance: the largest RMS drift of a rebuilt pair (relative to max(1,
            RMS(z_N))) accepted before the segment is recomputed; None (default): sqrt(eps)
            of the state's dtype (float32: 3.5e-4, float64: 1.5e-8); math.inf: never
            recompute (the paper's scheme, exact only while the drift stays small).

    Memory saved for backward: the last pair and the first iterate (plus x and one pair per
    checkpoint); transiently, one segment's pairs when it is recomputed.

    Backward stats (``deq.last_backward_stats``), all (batch,): "status" (SUCCESS, or
    NONFINITE where the sample's gradient is not finite), "nfe" (evaluations of f by the
    backward: 2 per reversed step, each followed by one VJP, plus those of recomputed
    segments), "n_steps" (steps reversed), "reconstruction_error" (the largest RMS
    difference between a rebuilt pair and a stored one: the first iterate, or a checkpoint),
    "recomputed_steps" (steps whose VJPs were redone on recomputed pairs).

    Raises:
        ValueError / TypeError at construction: beta outside (0, 1), checkpoint_every < 1,
        pair_dtype not a floating dtype, rebuild_tolerance <= 0; at the DEQ: a solver given
        with it, compact=True, a pair_dtype narrower than the state.

    Reference: McCallum, Arora & Foster, "Reversible Deep Equilibrium Models", arXiv
    2509.12917 (2025).
    """

    beta: float = 0.8
    checkpoint_every: int | str | None = "auto"
    pair_dtype: torch.dtype | None = torch.float64
    rebuild_tolerance: float | None = None

    def __post_init__(self) -> None:
        beta = self.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(
                f"Reversible(beta=...) must be a number in (0, 1), got {type(beta).__name__} "
                f"{beta!r}; e.g. Reversible(beta=0.5)."
            )
        if not 0.0 < float(beta) < 1.0:
            raise ValueError(
                f"Reversible(beta=...) must be in the open interval (0, 1), got {beta!r}: the "
                "reverse step divides by 1 - beta (beta = 1 is plain Picard, not invertible) "
                "and beta <= 0 never moves; e.g. Reversible(beta=0.5)."
            )
        every = self.checkpoint_every
        if isinstance(every, str):
            if every != "auto":
                raise ValueError(
                    f"Reversible(checkpoint_every=...) must be 'auto', None or an int >= 1, "
                    f"got {every!r}."
                )
        elif every is not None:
            check_positive_int("checkpoint_every", every)
        if self.rebuild_tolerance is not None:
            check_positive_or_inf("rebuild_tolerance", self.rebuild_tolerance)
        dtype = self.pair_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"Reversible(pair_dtype=...) must be a floating torch.dtype or None, got "
                f"{dtype!r}; e.g. pair_dtype=torch.float64."
            )

    def checkpoint_spacing(self, pair_dtype: torch.dtype) -> int | None:
        """Steps between stored pairs: checkpoint_every, or for "auto" the largest k whose
        worst-case amplification (1 − beta)^(−2k) keeps pair_dtype's rounding below its
        square root (float64: drift <= ~1e-8, under float32's resolution): k = 13 at
        beta = 0.5, 5 at 0.8, 25 at 0.3 (float64 pair)."""
        if self.checkpoint_every != "auto":
            return self.checkpoint_every  # type: ignore[return-value]
        growth = -2.0 * math.log1p(-float(self.beta))  # log of (1 - beta)^-2
        digits = -0.5 * math.log(torch.finfo(pair_dtype).eps)
        return max(1, math.floor(digits / growth))

    def bind(
        self,
        f: Fn,
        x: Any,
        parameters: Iterable[torch.Tensor],
        *,
        atol: float,
        rtol: float,
        max_steps: int,
        throw: bool = False,
        compact: bool = False,
    ) -> _BoundIteration:
        """The forward iteration bound to a DEQ call: `solve(z0) -> Solution` (no graph).

        DEQ calls this with its map, input, f_module's parameters and limits, and passes the
        result to `attach` as its `solve` (or calls it directly under no_grad).
        """
        if compact:
            raise ValueError(
                "DEQ(compact=True) is not supported with backward=eq.Reversible(): the "
                "reversible iteration freezes finished samples with masks instead; construct "
                "the DEQ with compact=False."
            )
        atol, rtol = check_tolerances(atol, rtol)
        return _BoundIteration(
            strategy=self, f=f, x=x, parameters=tuple(parameters), atol=atol, rtol=rtol,
            max_steps=check_positive_int("max_steps", max_steps), throw=throw,
        )

    def attach(
        self, f: Fn, z0: torch.Tensor, x: Any, solve: Any, record: Record
    ) -> tuple[torch.Tensor, Solution]:
        """The DEQ strategy interface: (z, forward Solution), z carrying the exact gradient."""
        if not isinstance(solve, _BoundIteration) or solve.strategy is not self:
            raise TypeError(
                "Reversible iterates itself under the DEQ's tolerances: use it through "
                "eq.DEQ(cell, backward=eq.Reversible()) (which binds it with "
                "Reversible.bind), not with another solver's solve function."
            )
        x_tensors = _flatten(x)
        parameters = tuple(p for p in solve.parameters if p.requires_grad)
        wants_grad = (
            z0.requires_grad or bool(parameters) or any(t.requires_grad for t in x_tensors)
        )
        if not torch.is_grad_enabled() or not wants_grad:
            solution = solve(z0)
            return solution.value, solution
        channel = _Channel(bound=solve, record=record)
        z = _ReversibleFunction.apply(channel, z0, *x_tensors, *parameters)
        return z, channel.solution  # type: ignore[return-value]  (set by that forward)


@dataclass
class _BoundIteration:
    """Reversible bound to one DEQ call (map, input, parameters, limits)."""

    strategy: Reversible
    f: Fn
    x: Any
    parameters: tuple[torch.Tensor, ...]
    atol: float
    rtol: float
    max_steps: int
    throw: bool

    def __call__(self, z0: torch.Tensor) -> Solution:
        with torch.no_grad():
            return self.run(z0.detach()).solution

    def run(self, z0: torch.Tensor) -> _Run:
        """The forward iteration under no_grad, keeping what the backward needs."""
        check_batched_state("z0", z0)
        x = _check_x(self.x, z0.shape[0])
        run = _forward(self, z0, x)
        if self.throw:
            run.solution.raise_if_failed("Reversible DEQ forward iteration")
        return run


@dataclass
class _Run:
    solution: Solution
    y_last: torch.Tensor  # (batch, ...) pair dtype: each sample's last committed pair
    z_last: torch.Tensor
    n_steps: torch.Tensor  # (batch,) int64 committed steps
    best_step: torch.Tensor  # (batch,) int64 the step of the returned iterate
    checkpoints: list[tuple[int, torch.Tensor, torch.Tensor]]  # (k, y_k, z_k) pair dtype


@dataclass
class _Channel:
    """Carries the bound iteration into the autograd Function and the Solution out of it."""

    bound: _BoundIteration
    record: Record
    solution: Solution | None = None


def check_positive_or_inf(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number > 0 or math.inf, got {type(value).__name__}.")
    if not value > 0:  # NaN fails too
        raise ValueError(f"{name} must be > 0 (or math.inf), got {value!r}; e.g. {name}=1e-4.")
    return float(value)


def _flatten(x: Any) -> tuple[torch.Tensor, ...]:
    if x is None:
        return ()
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


def _forward(bound: _BoundIteration, z0: torch.Tensor, x: Any) -> _Run:
    strategy = bound.strategy
    beta = float(strategy.beta)
    dtype = z0.dtype
    pair_dtype = dtype if strategy.pair_dtype is None else strategy.pair_dtype
    if torch.finfo(pair_dtype).bits < torch.finfo(dtype).bits:
        raise ValueError(
            f"Reversible(pair_dtype={pair_dtype}) is narrower than the state ({dtype}): the "
            "pair would lose what the state holds; use pair_dtype=torch.float64 or None."
        )
    every = strategy.checkpoint_spacing(pair_dtype)
    f, atol, rtol = bound.f, bound.atol, bound.rtol
    batch = z0.shape[0]
    device = z0.device

    fz = evaluate(f, z0, x, dtype)
    y = z = z0.to(pair_dtype)
    residual0 = rms_norm(fz - z0)
    finite0 = residual0 < math.inf  # NaN compares False
    status = torch.full((batch,), int(Status.NONFINITE), dtype=torch.int64, device=device)
    status.masked_fill_(finite0, int(Status.MAX_STEPS))
    status.masked_fill_(finite0 & (residual0 <= rms_norm(z0) * rtol + atol), int(Status.SUCCESS))
    running = status == int(Status.MAX_STEPS)
    limit = _DIVERGENCE_FACTOR * residual0
    best_value, best_residual = z0, residual0
    best_step = torch.zeros(batch, dtype=torch.int64, device=device)
    n_steps = torch.zeros_like(best_step)
    nfe = torch.ones_like(best_step)
    checkpoints: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    check_every = 1 if device.type == "cpu" else _CHECK_EVERY_WITHOUT_SYNC

    if bool(running.any()):
        for step in range(1, bound.max_steps + 1):
            y_next, z_next, fz_next = forward_step(f, y, z, fz, x, beta, dtype)
            value = z_next.to(dtype)
            residual = rms_norm(fz_next - value)
            tolerance = rms_norm(value) * rtol + atol
            nfe = nfe + 2 * running
            finite = residual < math.inf
            take = running & finite  # a non-finite step is not taken: the last pair stays
            keep = expand_as_batch(take, y)
            y = torch.where(keep, y_next, y)
            z = torch.where(keep, z_next, z)
            fz = torch.where(expand_as_batch(take, fz), fz_next, fz)
            n_steps = n_steps + take
            converged = take & (residual <= tolerance)
            improved = (take & (residual < best_residual)) | converged
            best_value = torch.where(expand_as_batch(improved, value), value, best_value)
            best_residual = torch.where(improved, residual, best_residual)
            best_step = torch.where(improved, step, best_step)
            diverged = take & ~converged & (residual > limit)
            status = status.masked_fill(running & ~finite, int(Status.NONFINITE))
            status = status.masked_fill(diverged, int(Status.DIVERGED))
            status = status.masked_fill(converged, int(Status.SUCCESS))
            running = status == int(Status.MAX_STEPS)
            if every is not None and step % every == 0:
                checkpoints.append((step, y, z))
            if (step % check_every == 0 or step == bound.max_steps) and not bool(running.any()):
                break

    solution = Solution(
        value=best_value, status=status,
        stats={"residual": best_residual, "n_steps": n_steps, "nfe": nfe},
    )
    # Checkpoints at or past the last committed step of every sample are never read.
    last = int(n_steps.max()) if batch else 0
    checkpoints = [c for c in checkpoints if c[0] < last]
    return _Run(solution, y, z, n_steps, best_step, checkpoints)


class _ReversibleFunction(torch.autograd.Function):
    """z_best = the reversible iteration from z0; backward: reverse it step by step."""

    @staticmethod
    def forward(ctx: Any, channel: _Channel, z0: torch.Tensor, *inputs: torch.Tensor):
        bound = channel.bound
        run = bound.run(z0.detach())
        channel.solution = run.solution
        n_x = len(_flatten(bound.x))
        ctx.channel = channel
        ctx.n_x = n_x
        # f_module's parameters (leaves, alive with the module): not activations to save.
        ctx.parameters = inputs[n_x:]
        ctx.checkpoint_steps = [k for k, _, _ in run.checkpoints]
        flat_checkpoints = [t for _, y, z in run.checkpoints for t in (y, z)]
        # Everything the backward reads goes through save_for_backward: nothing of the
        # forward iterations but the last pair (and checkpoints, when asked for).
        ctx.save_for_backward(
            z0, run.y_last, run.z_last, run.n_steps, run.best_step, *inputs[:n_x],
            *flat_checkpoints,
        )
        return run.solution.value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "DEQ with Reversible() does not support double backward (create_graph=True): "
                "its backward rebuilds the iterates outside autograd. Use backward=Unrolled() "
                "for higher-order gradients."
            )
        channel = ctx.channel
        bound = channel.bound
        z0, y_last, z_last, n_steps, best_step, *rest = ctx.saved_tensors
        x_saved = tuple(rest[: ctx.n_x])
        flat_checkpoints = rest[ctx.n_x:]
        checkpoints = {
            k: (flat_checkpoints[2 * i], flat_checkpoints[2 * i + 1])
            for i, k in enumerate(ctx.checkpoint_steps)
        }
        wants = ctx.needs_input_grad[2 + ctx.n_x:]
        parameters = tuple(p for p, want in zip(ctx.parameters, wants, strict=True) if want)
        grads = reverse_pass(bound, z0, y_last, z_last, n_steps, best_step, x_saved, checkpoints,
                         grad, parameters, ctx.needs_input_grad[2: 2 + ctx.n_x], channel.record)
        z0_grad, x_grads, parameter_grads = grads
        found = iter(parameter_grads)
        parameter_out = [next(found) if want else None for want in wants]
        return (None, z0_grad if ctx.needs_input_grad[1] else None, *x_grads, *parameter_out)
