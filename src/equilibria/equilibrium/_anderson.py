"""Anderson acceleration (type-II mixing), batched and safeguarded per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_unit_interval
from ._solver import FixedPointSolver, Fn, State, expand_as_batch, mutable

__all__ = ["Anderson"]


@dataclass(frozen=True)
class Anderson(FixedPointSolver):
    """Anderson acceleration: mix the last m iterates to minimise the linearised residual.

    With iterates z_i, values f_i = f(z_i) and residuals g_i = f_i - z_i (i over the last
    c <= m steps), per sample solve

        alpha = argmin ||sum_i alpha_i g_i||^2   subject to   sum_i alpha_i = 1

    via the regularised normal equations (G G^T + lambda I) a = 1, alpha = a / sum(a), with
    lambda = regularization * max_i ||g_i||^2 (relative, per sample), then set
    z <- sum_i alpha_i (z_i + beta g_i) = sum_i alpha_i (f_i - (1 - beta) g_i). The Gram
    matrix G G^T is updated one row per step, and all samples' c x c systems are solved in one
    batched `torch.linalg.solve_ex` (no Python loop over samples).

    Safeguard: a sample whose system is singular, ill-conditioned to the point of a
    non-finite solution, or has sum(a) ~ 0, takes a damped Picard step z + beta g that step
    instead; nothing raises.

    Arguments:
        m: history length (>= 1; m = 1 is damped Picard).
        regularization: relative Tikhonov term lambda (>= 0).
        damping: beta in (0, 1].

    Raises:
        ValueError / TypeError: m < 1, regularization < 0, damping outside (0, 1].

    One evaluation of f per step. Reference: Walker & Ni, "Anderson acceleration for
    fixed-point iterations", SIAM J. Numer. Anal. 49 (2011).
    """

    m: int = 5
    regularization: float = 1e-8
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int("m", self.m)
        reg = self.regularization
        if isinstance(reg, bool) or not isinstance(reg, (int, float)):
            raise TypeError(f"regularization must be a number >= 0, got {type(reg).__name__}.")
        if not reg >= 0 or reg == float("inf"):
            raise ValueError(f"regularization must be finite and >= 0, got {reg!r}; e.g. 1e-8.")
        check_unit_interval("damping", self.damping)

    # The history: f_i as the tensors f returned (state entries "f0".."f{m-1}": copying
    # them into a buffer would cost a 0.5 MB read and write per step at width 512, batch
    # 256, and the mixing reads each once), the residuals g_i in a (batch, m, n) buffer and
    # their Gram matrix. Slots fill 0, 1, ..., m-1, then the oldest is overwritten; the first
    # `count` are valid (the same count for every row: all rows have taken the same steps).
    # A new residual's Gram row is computed right after f is evaluated, and its diagonal
    # entry g.g hands the loop the residual norm, so the loop makes no second pass over g.
    #
    # Buffers are updated in place when autograd records nothing (the DEQ forward), and out
    # of place when it records the iterations (the Unrolled backward).

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        batch, width = z.shape[0], z[0].numel()
        # Uninitialised when written in place: slot i is written before anything reads it,
        # and zero-filling megabytes is measurable here.
        new = z.new_empty if mutable(z, fz) else z.new_zeros
        history = {
            "residuals": new(batch, self.m, width),
            "gram": z.new_zeros(batch, self.m, self.m),
        }
        return self._record(z, fz, history, slot=0, count=1)

    def _record(self, z: torch.Tensor, fz: torch.Tensor, history: State, slot: int,
                count: int) -> State:
        """Write g = f(z) - z into `slot` of the residual history and its row of the Gram
        matrix; return the state (z, fz, f{slot}, the history and the RMS residual)."""
        batch = z.shape[0]
        residuals, gram = history["residuals"], history["gram"]
        z_flat, f_flat = z.reshape(batch, -1), fz.reshape(batch, -1)
        in_place = mutable(z, fz, residuals, gram)
        if in_place:
            g = residuals[:, slot]
            torch.sub(f_flat, z_flat, out=g)
        else:
            g = f_flat - z_flat
            index = torch.tensor([slot], device=z.device)
            residuals = residuals.index_copy(1, index, g.unsqueeze(1))
        # Only the new residual's row changes: O(m n) instead of O(m^2 n). As g^T G^T: on CPU
        # this bmm orientation is ~10x faster than G g.
        row = torch.bmm(g.unsqueeze(1), residuals[:, :count].transpose(1, 2)).squeeze(1)
        if in_place:
            gram[:, slot, :count] = row
            gram[:, :count, slot] = row
        else:
            row = torch.cat([row, row.new_zeros(batch, self.m - count)], dim=1)
            gram = gram.index_copy(1, index, row.unsqueeze(1))
            gram = gram.index_copy(2, index, row.unsqueeze(2))
        width = g.shape[1]
        residual = row[:, slot].detach().sqrt()  # g.g: a sum of squares, never negative
        residual = residual.mul_(1.0 / math.sqrt(width)) if width else residual
        return {"z": z, "fz": fz, f"f{slot}": fz, "residuals": residuals, "gram": gram,
                "residual": residual}

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int]:
        z, fz = state["z"], state["fz"]
        count = min(step_index + 1, self.m)
        beta = self.damping
        if count == 1:
            z_next = torch.lerp(z, fz, beta) if beta != 1.0 else fz
        else:
            z_next = self._mix(z, fz, [state[f"f{i}"] for i in range(count)],
                               state["residuals"][:, :count], state["gram"][:, :count, :count])
        slot, count = (step_index + 1) % self.m, min(step_index + 2, self.m)
        new_state = self._record(z_next, fn(z_next), state, slot, count)
        new_state.update({f"f{i}": state[f"f{i}"] for i in range(count) if i != slot})
        return new_state, 1

    def _mix(self, z: torch.Tensor, fz: torch.Tensor, values: list[torch.Tensor],
             residuals: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """sum_i alpha_i (f_i - (1 - beta) g_i) from the c values f_i, the (batch, c, n)
        residuals and their (batch, c, c) Gram matrix; a sample whose mixing system failed
        takes the damped Picard step instead."""
        alpha, ok = self._weights(gram)
        batch = z.shape[0]
        weights = alpha.squeeze(1)
        mixed = values[0].reshape(batch, -1) * weights[:, :1]
        in_place = mutable(mixed, *values)
        for i in range(1, len(values)):
            add = mixed.addcmul_ if in_place else mixed.addcmul
            mixed = add(values[i].reshape(batch, -1), weights[:, i : i + 1])
        if self.damping != 1.0:
            mixed = mixed - (1 - self.damping) * torch.bmm(alpha, residuals).squeeze(1)
        mixed = mixed.reshape(z.shape)
        if ok is None:
            return mixed
        picard = torch.lerp(z, fz, self.damping) if self.damping != 1.0 else fz
        return torch.where(expand_as_batch(ok, z), mixed, picard)

    def _weights(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mixing weights alpha (batch, 1, c) from the (batch, c, c) Gram matrix, and the
        per-sample mask of systems that solved (None when all did: nothing to mask). A failed
        sample's weights are zero; `_safeguard` gives it a Picard step."""
        # Regularise by lambda max_i ||g_i||^2 on a copy's diagonal (no eye, no broadcast).
        scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1, keepdim=True)
        system = gram.clone()
        system.diagonal(dim1=1, dim2=2).add_(scale, alpha=self.regularization)
        ones = gram.new_ones(gram.shape[0], gram.shape[1], 1)
        a, info = torch.linalg.solve_ex(system, ones, check_errors=False)
        # sum(a) = 0 makes alpha non-finite, so the finiteness test also catches it.
        alpha = (a / a.sum(dim=1, keepdim=True)).transpose(1, 2)  # (batch, 1, c)
        # On CPU a host read is free: one reduction over every weight tells whether all
        # samples solved (a NaN or inf anywhere makes the sum non-finite). A singular system
        # (info > 0, a zero pivot) divides by that zero in the solve, so its a is non-finite
        # too, and info needs no separate read here.
        if gram.device.type == "cpu" and math.isfinite(float(alpha.detach().sum())):
            return alpha, None
        ok = torch.isfinite(alpha).all(dim=2).squeeze(1) & (info == 0)
        if alpha.requires_grad:
            # The failed systems' NaNs sit in the recorded graph, and torch.where's zero
            # gradient times them is NaN again: it would reach f's parameters through the
            # Gram matrix. Solve once more with those systems replaced by the identity.
            eye = torch.eye(system.shape[1], dtype=system.dtype, device=system.device)
            system = torch.where(ok[:, None, None], system, eye)
            a = torch.linalg.solve_ex(system, ones, check_errors=False)[0]
            alpha = (a / a.sum(dim=1, keepdim=True)).transpose(1, 2)
        return torch.where(ok[:, None, None], alpha, torch.zeros_like(alpha)), ok
