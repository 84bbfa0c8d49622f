"""The reverse pass of `Reversible`: the coupled step, its inverse, and backpropagation
through the rebuilt steps, segment by segment (see `_reversible.py` for the maths)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._checks import rms_norm
from .._solution import Status
from ..equilibrium._solver import expand_as_batch
from ._backward import check_f_output

__all__ = ["evaluate", "forward_step", "reverse_pass", "reverse_step"]

Fn = Callable[[torch.Tensor, Any], torch.Tensor]
Record = Callable[[dict[str, Any]], None]


def rebuild_x(x: Any, tensors: tuple[torch.Tensor, ...]) -> Any:
    """x's structure (None, a tensor or a tuple) around replacement tensors."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return tensors[0]
    return tuple(tensors)


def evaluate(f: Fn, pair_state: torch.Tensor, x: Any, dtype: torch.dtype) -> torch.Tensor:
    """f at a pair member, computed in the state's dtype."""
    z = pair_state.to(dtype)
    return check_f_output(f(z, x), z)


def forward_step(f: Fn, y: torch.Tensor, z: torch.Tensor, fz: torch.Tensor, x: Any,
                 beta: float, dtype: torch.dtype):
    """One coupled step from (y, z) with fz = f(z): returns (y', z', f(z')) (pair dtype for
    y', z'; f(z') in the state's dtype)."""
    y_next = (1.0 - beta) * y + beta * fz.to(y.dtype)
    fy = evaluate(f, y_next, x, dtype)
    z_next = (1.0 - beta) * z + beta * fy.to(z.dtype)
    return y_next, z_next, evaluate(f, z_next, x, dtype)


def reverse_step(f: Fn, y: torch.Tensor, z: torch.Tensor, x: Any, beta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair before a coupled step, rebuilt from the pair after it (no graph)."""
    z_before = (z - beta * evaluate(f, y, x, dtype).to(z.dtype)) / (1.0 - beta)
    y_before = (y - beta * evaluate(f, z_before, x, dtype).to(y.dtype)) / (1.0 - beta)
    return y_before, z_before


class _Sums:
    """Running sums of the VJP contributions to x and to the parameters."""

    def __init__(self, n_x: int, n_parameters: int) -> None:
        self.x: list[torch.Tensor | None] = [None] * n_x
        self.parameters: list[torch.Tensor | None] = [None] * n_parameters

    def add(self, x_grads: Iterable[torch.Tensor | None],
            parameter_grads: Iterable[torch.Tensor | None]) -> None:
        for sums, grads in ((self.x, x_grads), (self.parameters, parameter_grads)):
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] = g if sums[i] is None else sums[i] + g

    def merge(self, other: _Sums) -> None:
        self.add(other.x, other.parameters)


def reverse_pass(
    bound: Any,
    z0: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    n_steps: torch.Tensor,
    best_step: torch.Tensor,
    x_saved: tuple[torch.Tensor, ...],
    checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor]],
    grad: torch.Tensor,
    parameters: tuple[torch.Tensor, ...],
    x_needs: tuple[bool, ...],
    record: Record,
):
    """Rebuild each sample's pairs from its last one and backpropagate through every step.

    Adjoints (a_y, a_z) of the pair after step k; the VJPs of step k are, in order,
        z_k = (1 − β) z_{k−1} + β f(y_k):  a_y += β a_z ∂f/∂y (y_k);  θ, x get β a_z ∂f(y_k)
        y_k = (1 − β) y_{k−1} + β f(z_{k−1}):  a_z' = (1 − β) a_z + β a_y ∂f/∂z (z_{k−1});
                                               a_y' = (1 − β) a_y;  θ, x get β a_y ∂f(z_{k−1})
    A sample takes part in step k only when k <= its own step count (torch.where); its
    incoming gradient is added to a_z at its best step.

    The steps run in segments between known pairs (the start y_0 = z_0, and checkpoints).
    At the bottom of a segment the rebuilt pair is compared with the known one: when some
    sample drifted by more than sqrt(eps) of the state's dtype (relative to its scale), the
    segment's pairs are recomputed forwards from the known pair (stable: the forward
    contracts) and its VJPs redone from the adjoints at its top, so the gradient never uses
    a drifted pair (transient memory: that segment's pairs).
    """
    strategy = bound.strategy
    beta, f = float(strategy.beta), bound.f
    dtype = z0.dtype
    grad = grad.detach().to(z.dtype)
    x_leaves = tuple(
        t.detach().requires_grad_(need) if t.is_floating_point() else t
        for t, need in zip(x_saved, x_needs, strict=True)
    )
    x = rebuild_x(bound.x, x_leaves)
    x_wanted = [t for t, need in zip(x_leaves, x_needs, strict=True) if need]
    totals = _Sums(len(x_wanted), len(parameters))
    a_y = torch.zeros_like(y)
    a_z = torch.zeros_like(z)
    batch = z.shape[0]
    drift = torch.zeros(batch, dtype=torch.float64, device=z.device)
    recomputed = torch.zeros_like(n_steps)
    nfe = 2 * n_steps
    accepted = strategy.rebuild_tolerance
    if accepted is None:
        accepted = math.sqrt(torch.finfo(dtype).eps)
    threshold = torch.clamp(rms_norm(z).double(), min=1.0) * accepted
    last = int(n_steps.max()) if batch else 0
    # Above every sample's best step no gradient has entered yet: rebuild without VJPs.
    first_seed = int(best_step.max()) if batch else 0
    start = z0.to(z.dtype)
    known = {0: (start, start), **checkpoints}

    def vjp(at: torch.Tensor, cotangent: torch.Tensor,
            sums: _Sums) -> tuple[torch.Tensor, torch.Tensor]:
        """f(at) (no graph kept) and the VJP cotangent·∂f/∂at, summing θ's and x's."""
        leaf = at.to(dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            out = check_f_output(f(leaf, x), leaf)
            found = torch.autograd.grad(out, (leaf, *x_wanted, *parameters),
                                        cotangent.to(dtype), allow_unused=True)
        sums.add(found[1: 1 + len(x_wanted)], found[1 + len(x_wanted):])
        state_grad = found[0] if found[0] is not None else torch.zeros_like(leaf)
        return out.detach(), state_grad.to(at.dtype)

    def segment(lo, hi, y, z, a_y, a_z, pairs):
        """Steps hi, ..., lo + 1 backwards from the pair after step hi; `pairs` None
        (rebuild each earlier pair) or the recomputed pairs after steps lo, ..., hi − 1."""
        sums = _Sums(len(x_wanted), len(parameters))
        for step in range(hi, lo, -1):
            taking = expand_as_batch(n_steps >= step, y)
            if step > first_seed:
                if pairs is None:
                    y_before, z_before = reverse_step(f, y, z, x, beta, dtype)
                else:
                    y_before, z_before = pairs[step - 1 - lo]
                y = torch.where(taking, y_before, y)
                z = torch.where(taking, z_before, z)
                continue
            a_z = torch.where(expand_as_batch(best_step == step, grad), a_z + grad, a_z)
            fy, dy = vjp(y, beta * a_z, sums)
            a_y_total = a_y + dy
            if pairs is None:
                z_before = (z - beta * fy.to(z.dtype)) / (1.0 - beta)
            else:
                y_before, z_before = pairs[step - 1 - lo]
            fz, dz = vjp(z_before, beta * a_y_total, sums)
            if pairs is None:
                y_before = (y - beta * fz.to(y.dtype)) / (1.0 - beta)
            a_z = torch.where(taking, (1.0 - beta) * a_z + dz, a_z)
            a_y = torch.where(taking, (1.0 - beta) * a_y_total, a_y)
            y = torch.where(taking, y_before, y)
            z = torch.where(taking, z_before, z)
        return y, z, a_y, a_z, sums

    def recompute(lo, hi):
        """The pairs after steps lo, ..., hi − 1, forwards from the known pair at lo."""
        y, z = known[lo]
        fz = evaluate(f, z, x, dtype)
        pairs = [(y, z)]
        for step in range(lo + 1, hi):
            y_next, z_next, fz_next = forward_step(f, y, z, fz, x, beta, dtype)
            taking = n_steps >= step
            y = torch.where(expand_as_batch(taking, y), y_next, y)
            z = torch.where(expand_as_batch(taking, z), z_next, z)
            fz = torch.where(expand_as_batch(taking, fz), fz_next, fz)
            pairs.append((y, z))
        return pairs

    hi = last
    for lo in sorted((k for k in known if k < last), reverse=True):
        y_rebuilt, z_rebuilt, a_y_next, a_z_next, sums = segment(lo, hi, y, z, a_y, a_z, None)
        y_known, z_known = known[lo]
        distance = _pair_distance(y_rebuilt, z_rebuilt, y_known, z_known)
        drift = torch.maximum(drift, distance)
        # NaN (an overflowed rebuild) counts as drifted: it compares False with <=
        if lo < first_seed and not bool((distance <= threshold).all()):
            _, _, a_y_next, a_z_next, sums = segment(lo, hi, y, z, a_y, a_z,
                                                     recompute(lo, hi))
            steps_here = (torch.clamp(n_steps, max=hi) - lo).clamp(min=0)
            redone = (torch.clamp(n_steps, max=min(hi, first_seed)) - lo).clamp(min=0)
            recomputed = recomputed + steps_here
            # the forward recompute (f(z_lo), then 2 a step below the top) and the redone VJPs
            nfe = nfe + (steps_here > 0) + 2 * (steps_here - (n_steps >= hi).long()) + 2 * redone
        totals.merge(sums)
        a_y, a_z = a_y_next, a_z_next
        y, z = y_known, z_known
        hi = lo
    a_z = torch.where(expand_as_batch(best_step == 0, grad), a_z + grad, a_z)

    z0_grad = (a_y + a_z).to(dtype)
    finite = torch.isfinite(z0_grad.reshape(batch, -1)).all(dim=1)
    status = torch.where(finite, int(Status.SUCCESS), int(Status.NONFINITE))
    record({
        "strategy": "Reversible",
        "status": status,
        "nfe": nfe,
        "n_steps": n_steps.clone(),
        "reconstruction_error": drift,
        "recomputed_steps": recomputed,
    })

    x_grads: list[torch.Tensor | None] = []
    summed = iter(totals.x)
    for t, need in zip(x_leaves, x_needs, strict=True):
        if not need:
            x_grads.append(None)
            continue
        total = next(summed)
        x_grads.append(torch.zeros_like(t) if total is None else total)
    parameter_grads = [
        torch.zeros_like(p) if total is None else total
        for p, total in zip(parameters, totals.parameters, strict=True)
    ]
    return z0_grad, x_grads, parameter_grads


def _pair_distance(y: torch.Tensor, z: torch.Tensor, y_known: torch.Tensor,
                   z_known: torch.Tensor) -> torch.Tensor:
    """(batch,) float64: the larger RMS difference of the two pair members."""
    return torch.maximum(rms_norm((y - y_known).double()), rms_norm((z - z_known).double()))
