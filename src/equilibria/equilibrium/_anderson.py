"""Anderson acceleration (type-II mixing), batched and safeguarded per sample."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_unit_interval
from ._anderson_views import RecordViews, cached_views, mixing_weights
from ._solver import (
    FixedPointSolver,
    Fn,
    NormLayout,
    State,
    expand_as_batch,
    mutable,
    write_into,
)

__all__ = ["Anderson"]


@functools.lru_cache(maxsize=64)
def _layouts(m: int, regularization: float) -> tuple[NormLayout, ...]:
    """The norms' layout after step s is the entry s % m: the new residual in slot
    (s + 1) % m, the previous one in slot s % m (none when m = 1), ||z|| in column m."""
    scale = 1.0 / math.sqrt(1.0 + regularization)
    return tuple(NormLayout(residual=(s + 1) % m, z=m, previous=s if m > 1 else None,
                            residual_scale=scale) for s in range(m))


def _row_norms(flat: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.linalg.vector_norm(flat, dim=1, out=out)


@functools.lru_cache(maxsize=64)
def _constants(m: int, regularization: float, damping: float, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The constant buffers of a solve, made once per process (never written: the state
    holds expanded views of them; the Gram buffer is a copy of the border):

    - the border of the bordered system (1, m + 1, m + 1): row/column 0 ones but (0, 0);
    - the right-hand sides (1, m + 1, 1 or 2): [1, 0, ..., 0] and [-(1 - beta), 0, ..., 0],
      so that the solution's columns are [mu, alpha] and (beta - 1) [mu, alpha];
    - the Gram row scales (1, m, m): row i scales the new Gram row of slot i, 1 +
      regularization on the diagonal (computed in the state's dtype, as the step did).
    """
    # Plain tensors even when the first solve runs under inference_mode (a later recorded,
    # Unrolled, solve saves them for backward); made by fills on the device, not copied
    # from the host (a copy to a CUDA device is a host sync, refused inside a solve).
    with torch.inference_mode(False), torch.no_grad():
        border = torch.ones(1, m + 1, m + 1, dtype=dtype, device=device)
        border[:, 1:, 1:] = 0
        border[:, 0, 0] = 0
        rhs = torch.zeros(1, m + 1, 1 if damping == 1.0 else 2, dtype=dtype, device=device)
        rhs[0, 0, 0] = 1.0
        if damping != 1.0:
            rhs[0, 0, 1] = damping - 1.0
        row_scale = torch.eye(m, dtype=dtype, device=device).mul_(regularization).add_(1.0)
        return border, rhs, row_scale.unsqueeze(0)


def _all_finite(solution: torch.Tensor) -> bool:
    """Whether every element of a CPU tensor is finite, by one host read: a small one (a
    batch-1 solution) summed on the host from its values (no kernel: half the time of a
    sum and its read), a larger one by its sum. A sum that overflows says False, which
    only sends the caller to its exact per-sample check."""
    if solution.numel() <= _HOST_SUM_LIMIT:
        total = 0.0
        for sample in solution.tolist():
            for row in sample:
                total += sum(row)
        return math.isfinite(total)
    return math.isfinite(float(solution.sum()))


# Up to this many elements a host-side sum of `tolist()` beats a sum kernel and its read.
_HOST_SUM_LIMIT = 64


def _write_record(views: RecordViews, f_flat: torch.Tensor, z_flat: torch.Tensor) -> None:
    """A step's writes into the buffers, in place: f and g into the slot, the new Gram row
    and column (the regularised diagonal entry written with the row, by one multiply),
    every valid slot's norm and ||z||."""
    views.f.copy_(f_flat)
    torch.sub(f_flat, z_flat, out=views.g)
    row = torch.bmm(views.g_row, views.g_columns)
    torch.mul(row, views.scale, out=views.kkt_row)
    torch.mul(row, views.scale, out=views.kkt_column)
    torch.sqrt(views.diagonal, out=views.norms_g)
    _row_norms(z_flat, out=views.norms_z)


@dataclass(frozen=True)
class Anderson(FixedPointSolver):
    """Anderson acceleration: mix the last m iterates to minimise the linearised residual.

    With iterates z_i, values f_i = f(z_i) and residuals g_i = f_i - z_i (i over the last
    c <= m steps), per sample solve

        alpha = argmin ||sum_i alpha_i g_i||^2   subject to   sum_i alpha_i = 1

    through its bordered (KKT) system [[0, 1^T], [1, G G^T + Lambda]] [mu; alpha] = [1; 0],
    with the relative Tikhonov term Lambda = regularization * diag(G G^T) (each g_i's own
    squared norm, so the term does not depend on the residuals' scale), then set
    z <- sum_i alpha_i (f_i - (1 - beta) g_i). The Gram matrix G G^T is updated one row per
    step, and all samples' systems are solved in one batched `torch.linalg.solve_ex` (no
    Python loop over samples), whose right-hand side yields alpha and (1 - beta) alpha at once.

    Safeguard: a sample whose system is singular or ill-conditioned to the point of a
    non-finite solution takes a damped Picard step z + beta g that step instead; nothing
    raises.

    Arguments:
        m: history length (>= 1; m = 1 is damped Picard).
        regularization: relative Tikhonov term (>= 0).
        damping: beta in (0, 1].

    Raises:
        ValueError / TypeError: m < 1, regularization < 0, damping outside (0, 1].

    One evaluation of f per step. Reference: Walker & Ni, "Anderson acceleration for
    fixed-point iterations", SIAM J. Numer. Anal. 49 (2011).
    """

    m: int = 5
    regularization: float = 1e-8
    damping: float = 1.0
    uses_tolerance = False

    @property
    def period(self) -> int:  # the history's ring of slots
        return self.m

    @property
    def warmup(self) -> int:  # steps before the history is full
        return self.m - 1

    def __post_init__(self) -> None:
        check_positive_int("m", self.m)
        reg = self.regularization
        if isinstance(reg, bool) or not isinstance(reg, (int, float)):
            raise TypeError(f"regularization must be a number >= 0, got {type(reg).__name__}.")
        if not reg >= 0 or reg == float("inf"):
            raise ValueError(f"regularization must be finite and >= 0, got {reg!r}; e.g. 1e-8.")
        check_unit_interval("damping", self.damping)

    # Per step, beside f, the solver launches: two writes of the history (f and g), one bmm
    # for the new Gram row and two writes of it (row, with the regularised diagonal entry,
    # and column), two norms for the loop's test, one batched solve, one finiteness read (on
    # the host for a small solution: `_all_finite`) and one bmm for the mixing. Every buffer
    # is allocated once, in `init`, and the views of them once per solve
    # (`_anderson_views`); with autograd off the step is `_step_in_place`.
    #
    # The history is one (m, 2, batch, n) buffer, slot-major: slot i holds [f_i, g_i], so
    # each write is a contiguous (batch, n) block, and the mixing is one bmm of the solved
    # coefficients [alpha_i, -(1 - beta) alpha_i] with the interleaved rows. The state holds
    # it as a batch-first view (the loop compacts dim 0). Slots fill 0, 1, ..., m-1, then the
    # oldest is overwritten; the first `count` are valid (the same for every row).
    #
    # "kkt" (batch, m + 1, m + 1) is the bordered system: row/column 0 the constraint, the
    # regularised Gram matrix below it. "norms" (batch, m + 1) are plain 2-norms for the
    # loop: column i = sqrt((1 + reg) g_i.g_i) (the regularised diagonal), column m = ||z||;
    # `norm_layout` says which column is which.
    #
    # Buffers are updated in place when autograd records nothing (the DEQ forward), and out
    # of place when it records the iterations (the Unrolled backward).

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        batch, width, m = z.shape[0], z[0].numel(), self.m
        in_place = mutable(z, fz)
        # Uninitialised when written in place: slot i is written before anything reads it.
        new = z.new_empty if in_place else z.new_zeros
        history = new(m, 2, batch, width).permute(2, 0, 1, 3)
        border, rhs, row_scale = _constants(m, self.regularization, self.damping, z.dtype,
                                            z.device)
        kkt = border.repeat(batch, 1, 1)
        norms = z.new_zeros(m + 1, batch).T
        state = {"history": history, "kkt": kkt, "norms": norms,
                 "rhs": rhs.expand(batch, -1, -1), "row_scale": row_scale.expand(batch, -1, -1)}
        return self._record(z, fz, state, slot=0, count=1)

    def norm_layout(self, step_index: int) -> NormLayout:
        return _layouts(self.m, self.regularization)[step_index % self.m]

    def _record(self, z: torch.Tensor, fz: torch.Tensor, state: State, slot: int,
                count: int) -> State:
        """Write f(z) and g = f(z) - z into `slot` of the history, the new Gram row and
        column, and the norms; return the new state."""
        batch = z.shape[0]
        history, kkt, norms = state["history"], state["kkt"], state["norms"]
        z_flat = z if z.dim() == 2 else z.reshape(batch, -1)
        f_flat = fz if fz.dim() == 2 else fz.reshape(batch, -1)
        if mutable(z, fz, history, kkt) and not torch.compiler.is_compiling():
            _write_record(cached_views(state, ("record", slot, count)), f_flat,
                          z_flat if not z_flat.requires_grad else z_flat.detach())
            return {"z": z, "fz": fz, "history": history, "kkt": kkt, "norms": norms,
                    "rhs": state["rhs"], "row_scale": state["row_scale"]}
        in_place = mutable(z, fz, history, kkt)
        if in_place:
            history[:, slot, 0].copy_(f_flat)
            g = write_into(history[:, slot, 1], torch.sub, f_flat, z_flat)
        else:
            g = f_flat - z_flat
            pair = torch.stack([f_flat, g], dim=1).unsqueeze(1)
            history = history.index_copy(1, torch.tensor([slot], device=z.device), pair)
        # Only the new residual's row of G G^T changes: O(m n) instead of O(m^2 n).
        row = torch.bmm(g.unsqueeze(1), history[:, :count, 1].transpose(1, 2))
        scale = state["row_scale"][:, slot : slot + 1, :count]
        if in_place:
            write_into(kkt[:, slot + 1 : slot + 2, 1 : count + 1], torch.mul, row, scale)
            write_into(kkt[:, 1 : count + 1, slot + 1], torch.mul, row.squeeze(1),
                       scale.squeeze(1))
        else:
            index = torch.tensor([slot + 1], device=z.device)
            full = torch.cat([kkt[:, slot + 1 : slot + 2, :1], row * scale,
                              kkt[:, slot + 1 : slot + 2, count + 1 :]], dim=2)
            kkt = kkt.index_copy(1, index, full)
            kkt = kkt.index_copy(2, index, full.transpose(1, 2))
        with torch.no_grad():
            # The loop's norms: every valid slot's regularised residual norm, and ||z||.
            diagonal = kkt.detach().diagonal(dim1=1, dim2=2)[:, 1 : count + 1]
            write_into(norms[:, :count], torch.sqrt, diagonal)
            write_into(norms[:, self.m], _row_norms, z_flat.detach())
        return {"z": z, "fz": fz, "history": history, "kkt": kkt, "norms": norms,
                "rhs": state["rhs"], "row_scale": state["row_scale"]}

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int]:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._step_in_place(fn, state, step_index), 1
        z, fz = state["z"], state["fz"]
        count = min(step_index + 1, self.m)
        beta = self.damping
        if count == 1:
            z_next = torch.lerp(z, fz, beta) if beta != 1.0 else fz
        else:
            z_next = self._mix(z, fz, state, count)
        slot, count = (step_index + 1) % self.m, min(step_index + 2, self.m)
        return self._record(z_next, fn(z_next), state, slot, count), 1

    def _step_in_place(self, fn: Fn, state: State, step_index: int) -> State:
        """`step` when autograd records nothing (the DEQ forward), eagerly: the same calls on
        the buffers' cached views, without the per-call checks of `_mix` and `_record`, the
        state updated in place. At batch 1 the Python around a step's dozen calls cost about
        as much as the calls."""
        m, z, fz = self.m, state["z"], state["fz"]
        count = step_index + 1 if step_index < m else m
        mix, record = cached_views(state, ("step", (step_index + 1) % m, count))
        if count == 1:
            z_next = torch.lerp(z, fz, self.damping) if self.damping != 1.0 else fz
        else:
            solution, info = torch.linalg.solve_ex(mix.system, mix.rhs, check_errors=False)
            # The finiteness read of `_combine`, first: on CPU, when every coefficient is
            # finite (every sample solved), the weights are a cached view of the solution.
            if mix.cpu and _all_finite(solution):
                weights = mixing_weights(state, solution, count)
                z_next = torch.bmm(weights, mix.rows).reshape(z.shape)
            else:
                z_next = self._combine(z, fz, state, count, solution, info, mix.rows)
        fz_next = fn(z_next)
        batch = z_next.shape[0]
        z_flat = z_next if z_next.dim() == 2 else z_next.reshape(batch, -1)
        f_flat = fz_next if fz_next.dim() == 2 else fz_next.reshape(batch, -1)
        _write_record(record, f_flat, z_flat)
        state["z"], state["fz"] = z_next, fz_next
        return state

    def _mix(self, z: torch.Tensor, fz: torch.Tensor, state: State, count: int) -> torch.Tensor:
        """sum_i alpha_i (f_i - (1 - beta) g_i) over the `count` valid slots; a sample whose
        system failed takes the damped Picard step instead."""
        batch = z.shape[0]
        kkt, rhs, history = state["kkt"], state["rhs"], state["history"]
        fast = not torch.compiler.is_compiling() and mutable(history, kkt)
        views = cached_views(state, ("mix", 0, count)) if fast else None
        if views is not None:
            solution, info = torch.linalg.solve_ex(views.system, views.rhs, check_errors=False)
            rows = views.rows
        else:
            solution, info = torch.linalg.solve_ex(kkt[:, : count + 1, : count + 1],
                                                   rhs[:, : count + 1], check_errors=False)
            rows = (history[:, :count, 0] if solution.shape[2] == 1
                    else history[:, :count].reshape(batch, 2 * count, -1))
        return self._combine(z, fz, state, count, solution, info, rows)

    def _combine(self, z: torch.Tensor, fz: torch.Tensor, state: State, count: int,
                 solution: torch.Tensor, info: torch.Tensor, rows: torch.Tensor
                 ) -> torch.Tensor:
        """The mixing from the systems' `solution` (and LAPACK's `info`), with the history's
        `rows`; the samples whose system failed take the damped Picard step."""
        batch = z.shape[0]
        kkt, rhs = state["kkt"], state["rhs"]
        ok = None
        # On CPU a host read is free: one reduction over every coefficient tells whether all
        # samples solved (a NaN or inf anywhere makes the sum non-finite; a singular system,
        # info > 0, divides by its zero pivot, so its solution is non-finite too). Elsewhere,
        # and in a captured region, the per-sample mask costs no host read.
        eager_cpu = z.device.type == "cpu" and not torch.compiler.is_compiling()
        check = solution.detach() if solution.requires_grad else solution
        if not (eager_cpu and math.isfinite(float(check.sum()))):
            ok = torch.isfinite(solution).all(dim=2).all(dim=1) & (info == 0)
            if solution.requires_grad:
                # The failed systems' NaNs sit in the recorded graph, and torch.where's zero
                # gradient times them is NaN again: solve once more with those systems
                # replaced by an invertible one (whose weights torch.where discards).
                eye = torch.eye(count + 1, dtype=kkt.dtype, device=kkt.device)
                system = torch.where(ok[:, None, None], kkt[:, : count + 1, : count + 1], eye)
                solution = torch.linalg.solve_ex(system, rhs[:, : count + 1],
                                                 check_errors=False)[0]
            solution = torch.where(ok[:, None, None], solution, torch.zeros_like(solution))
        # Drop mu; [alpha_i, (beta - 1) alpha_i] interleaved as the history's [f_i, g_i] rows.
        columns = solution.shape[2]
        weights = solution[:, 1:].reshape(batch, 1, count * columns)
        mixed = torch.bmm(weights, rows).reshape(z.shape)
        if ok is None:
            return mixed
        picard = torch.lerp(z, fz, self.damping) if self.damping != 1.0 else fz
        return torch.where(expand_as_batch(ok, z), mixed, picard)
