"""Anderson acceleration (type-II mixing), batched and safeguarded per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_unit_interval
from ._solver import FixedPointSolver, Fn, State, expand_as_batch, mutable

__all__ = ["Anderson"]


@dataclass(frozen=True)
class Anderson(FixedPointSolver):
    """Anderson acceleration: mix the last m iterates to minimise the linearised residual.

    With iterates z_i and residuals g_i = f(z_i) - z_i (i over the last c <= m steps), per
    sample solve

        alpha = argmin ||sum_i alpha_i g_i||^2   subject to   sum_i alpha_i = 1

    via the regularised normal equations (G G^T + lambda I) a = 1, alpha = a / sum(a), with
    lambda = regularization * max_i ||g_i||^2 (relative, per sample), then set
    z <- sum_i alpha_i (z_i + beta g_i). The Gram matrix G G^T is updated one row per step,
    and all samples' c x c systems are solved in one batched `torch.linalg.solve_ex` (no
    Python loop over samples).

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

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        batch = z.shape[0]
        # Uninitialised: slot i is written at step i before anything reads it (only the first
        # `count` slots are ever read), and zero-filling megabytes is measurable here.
        width = z[0].numel()
        return {
            "z": z,
            "fz": fz,
            "residuals": z.new_empty(batch, self.m, width),  # g_i = f(z_i) - z_i, flattened
            "gram": z.new_zeros(batch, self.m, self.m),  # g_i . g_j, kept up to date
        }

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int]:
        z, fz = state["z"], state["fz"]
        batch = z.shape[0]
        f_flat = fz.reshape(batch, -1)
        residuals, gram = state["residuals"], state["gram"]
        slot = step_index % self.m
        # Slots fill in order 0, 1, ..., so the first `count` hold the valid history (the same
        # count for every row: all rows in the state have taken the same number of steps).
        count = min(step_index + 1, self.m)
        g = state.get("g")
        in_place = mutable(z, fz, residuals, gram)
        if in_place:
            target = residuals[:, slot]
            # The previous step wrote g = f(z) - z straight into this slot (saving a 0.5 MB
            # allocation and copy per step); after compaction or at step 0 it is elsewhere.
            if g is None:
                torch.sub(f_flat, z.reshape(batch, -1), out=target)
            elif g.data_ptr() != target.data_ptr():
                target.copy_(g.reshape(batch, -1))
            g_flat = target
        else:
            g_flat = (fz - z if g is None else g).reshape(batch, -1)
            index = torch.tensor([slot], device=z.device)
            residuals = residuals.index_copy(1, index, g_flat.unsqueeze(1))
        # Only the new residual's row of the Gram matrix changes: O(m n) instead of O(m^2 n).
        # Computed as g^T G^T: on CPU this bmm orientation is ~10x faster than G g.
        row = torch.bmm(g_flat.unsqueeze(1), residuals[:, :count].transpose(1, 2)).squeeze(1)
        if in_place:
            gram[:, slot, :count] = row
            gram[:, :count, slot] = row
        else:
            index = torch.tensor([slot], device=z.device)
            row = torch.cat([row, row.new_zeros(batch, self.m - count)], dim=1)
            gram = gram.index_copy(1, index, row.unsqueeze(1))
            gram = gram.index_copy(2, index, row.unsqueeze(2))
        beta = self.damping
        # f(z_i) is kept as the tensor f returned, one state entry per slot (every state entry
        # must be a batch-first tensor for the loop's compaction): copying it into a history
        # buffer cost a 0.5 MB read and write per step, and the mixing reads it only once.
        values = [fz if i == slot else state[f"f{i}"] for i in range(count)]
        new_state = {"residuals": residuals, "gram": gram, f"f{slot}": fz}
        new_state.update({f"f{i}": state[f"f{i}"] for i in range(count) if i != slot})
        if count == 1:
            z_next = torch.lerp(z, fz, beta) if beta != 1.0 else fz
        else:
            z_next = self._mix(z, fz, values, residuals[:, :count],
                               gram[:, :count, :count])
        fz_next = fn(z_next)
        if in_place and not fz_next.requires_grad:
            # g for the next step, written into the slot that step fills (its oldest entry,
            # which nothing reads any more: this step's Gram row and mixing are done).
            target = residuals[:, (step_index + 1) % self.m]
            torch.sub(fz_next.reshape(batch, -1), z_next.reshape(batch, -1), out=target)
            g_next = target.view(z.shape)
        else:
            g_next = fz_next - z_next
        new_state.update(z=z_next, fz=fz_next, g=g_next)
        return new_state, 1

    def _mix(self, z: torch.Tensor, fz: torch.Tensor, values: list[torch.Tensor],
             residuals: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """The Anderson iterate from the c values f(z_i), the (batch, c, n) residual history
        and its (batch, c, c) Gram matrix; a sample whose mixing system fails (singular,
        non-finite solution, sum(a) = 0) takes the damped Picard step instead."""
        # Regularise by lambda max_i ||g_i||^2 on a copy's diagonal (no eye, no broadcast).
        scale = self.regularization * gram.diagonal(dim1=1, dim2=2).amax(dim=1, keepdim=True)
        # In place on a fresh copy: autograd has saved nothing of it yet (amax read `gram`).
        system = gram.clone()
        system.diagonal(dim1=1, dim2=2).add_(scale)
        ones = z.new_ones(z.shape[0], gram.shape[1], 1)
        a, info = torch.linalg.solve_ex(system, ones, check_errors=False)
        # sum(a) = 0 makes alpha non-finite, so the finiteness test also catches it.
        alpha = (a / a.sum(dim=1, keepdim=True)).transpose(1, 2)  # (batch, 1, c)
        ok = torch.isfinite(alpha).all(dim=2).squeeze(1) & (info == 0)
        # On CPU the check is free and almost always passes: then no masking at all.
        all_ok = z.device.type == "cpu" and bool(ok.all())
        if not all_ok:
            alpha = torch.where(ok[:, None, None], alpha, torch.zeros_like(alpha))
        # sum_i alpha_i (z_i + beta g_i) = sum_i alpha_i (f_i - (1 - beta) g_i).
        batch = z.shape[0]
        weights = alpha.squeeze(1)
        mixed = values[0].reshape(batch, -1) * weights[:, :1]
        accumulate = mixed.addcmul_ if mutable(mixed) else mixed.addcmul
        for i in range(1, len(values)):
            mixed = accumulate(values[i].reshape(batch, -1), weights[:, i : i + 1])
            accumulate = mixed.addcmul_ if mutable(mixed) else mixed.addcmul
        beta = self.damping
        if beta != 1.0:
            mixed = mixed - (1 - beta) * torch.bmm(alpha, residuals).squeeze(1)
        mixed = mixed.reshape(z.shape)
        if not all_ok:
            picard = torch.lerp(z, fz, beta) if beta != 1.0 else fz
            mixed = torch.where(expand_as_batch(ok, z), mixed, picard)
        return mixed
