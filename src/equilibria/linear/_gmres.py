"""Batched, matrix-free, restarted GMRES with per-sample convergence."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._autocast import outside_autocast
from .._checks import (
    check_finite,
    check_positive_int,
    check_tolerances,
    deliberate_sync,
    rms_norm,
    row_norm,
)
from .._solution import Solution, Status

__all__ = ["GMRES"]

Matvec = Callable[[torch.Tensor], torch.Tensor]
# Off the CPU, `bool(tensor)` waits for the device: "is any sample still running?" is asked
# every few Arnoldi iterations there.
_CHECK_EVERY_WITHOUT_SYNC = 4


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return torch.full_like(like, float(value))


def _assign(buffer: torch.Tensor, dim: int, index: torch.Tensor, value: torch.Tensor
            ) -> torch.Tensor:
    """buffer with the slices `index` along `dim` set to value: in place, or out of place
    when autograd records (GMRES inside an Unrolled Newton-Krylov solve)."""
    if torch.is_grad_enabled() and (value.requires_grad or buffer.requires_grad):
        return buffer.index_copy(dim, index, value)
    return buffer.index_copy_(dim, index, value)


@dataclass(frozen=True)
class GMRES:
    """Restarted GMRES for a batch of linear systems A_i x_i = b_i, given only x -> A x.

    Each sample runs its own Krylov iteration inside one batched Arnoldi process: it stops
    extending its basis as soon as its residual estimate passes

        ||b - A x|| <= atol + rtol * ||b||      (RMS norms over the sample's elements),

    and its update uses only its own basis vectors, so its answer does not depend on its
    batch-mates. Orthogonalisation is classical Gram-Schmidt applied twice (CGS2, two batched
    matrix products per iteration, as stable as modified Gram-Schmidt); the small least-squares
    problem is kept triangular with Givens rotations.

    Arguments:
        restart: Krylov dimension per cycle (>= 1).
        max_iters: total Arnoldi iterations (matrix-vector products, not counting residual
            recomputations), over all cycles (>= 1).
        atol, rtol: tolerances (> 0) of the per-sample test above.

    Raises:
        ValueError / TypeError: restart or max_iters < 1, tolerances <= 0.

    Reference: Saad & Schultz, "GMRES: a generalized minimal residual algorithm", SIAM J. Sci.
    Stat. Comput. 7 (1986); Saad, "Iterative Methods for Sparse Linear Systems", 2003, §6.5.
    """

    restart: int = 20
    max_iters: int = 100
    atol: float = 1e-8
    rtol: float = 1e-6

    def __post_init__(self) -> None:
        check_positive_int("restart", self.restart)
        check_positive_int("max_iters", self.max_iters)
        check_tolerances(self.atol, self.rtol)

    @outside_autocast(fn="matvec", state="b")
    def solve(
        self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None
    ) -> Solution:
        """Solve A x = b per sample.

        Arguments:
            matvec: x -> A x on (batch, ...) tensors, linear in each sample's row and acting
                on each row independently (e.g. a batched JVP or VJP).
            b: (batch, ...) floating right-hand sides.
            x0: optional (batch, ...) first guess (zeros when None).

        Returns:
            Solution with ``value`` x (batch, ...); ``status`` SUCCESS, MAX_STEPS (tolerance
            not reached within max_iters), SINGULAR (A is singular on the sample's Krylov
            space: x is the least-squares answer there) or NONFINITE per sample;
            ``stats["residual"]`` (batch,) RMS of b - A x (the GMRES estimate for a sample
            that converged, the true residual, one more product, for one that did not),
            ``stats["n_iters"]`` (batch,) Arnoldi iterations the sample used,
            ``stats["nmatvec"]`` (batch,) products computed on the sample's row (the
            batched products include finished rows).

        Raises:
            TypeError / ValueError: matvec not callable, b or x0 not floating tensors, shape
                mismatch, non-finite b or x0, matvec returning the wrong shape or dtype.
        """
        if not callable(matvec):
            raise TypeError(f"matvec must be callable x -> A x, got {type(matvec).__name__}.")
        if not isinstance(b, torch.Tensor) or not b.is_floating_point() or b.dim() == 0:
            raise TypeError("b must be a floating torch.Tensor with the batch in dim 0.")
        check_finite("b", b)
        if x0 is not None:
            if not isinstance(x0, torch.Tensor):
                raise TypeError(f"x0 must be a torch.Tensor or None, got {type(x0).__name__}.")
            if x0.shape != b.shape or x0.dtype != b.dtype:
                raise ValueError(
                    f"x0 must match b (shape {tuple(b.shape)}, {b.dtype}), got shape "
                    f"{tuple(x0.shape)}, {x0.dtype}."
                )
            check_finite("x0", x0)
        return self._solve(matvec, b, x0, self.atol, self.rtol)

    def _solve(
        self,
        matvec: Matvec,
        b: torch.Tensor,
        x0: torch.Tensor | None,
        atol: float | torch.Tensor,
        rtol: float | torch.Tensor,
    ) -> Solution:
        """`solve` with tolerances given per sample ((batch,) tensors) or as floats."""
        batch = b.shape[0]
        shape = b.shape
        n = b[0].numel()
        device = b.device
        flat_b = b.reshape(batch, -1)
        b_norm = rms_norm(b).detach()
        # The least-squares residual is a 2-norm; the test is on the RMS norm.
        target = (_per_sample(atol, b_norm) + _per_sample(rtol, b_norm) * b_norm) * math.sqrt(n)

        def apply(v: torch.Tensor) -> torch.Tensor:
            out = matvec(v.reshape(shape))
            if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != b.dtype:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"matvec must return a tensor of b's shape {tuple(shape)} and dtype "
                    f"{b.dtype}, got {got}."
                )
            return out.reshape(batch, -1)

        nmatvec = torch.zeros(batch, dtype=torch.int64, device=device)
        n_iters = torch.zeros(batch, dtype=torch.int64, device=device)
        if x0 is None:
            x = torch.zeros_like(flat_b)
            r = flat_b
        else:
            x = x0.reshape(batch, -1)
            r = flat_b - apply(x)
            nmatvec += 1
        beta = row_norm(r).detach()
        residual_norm = beta
        # A sample whose Arnoldi process met a zero pivot: its operator is singular on the
        # Krylov space. It keeps the least-squares answer of the columns before the pivot
        # and stops (a restart would meet the same pivot again).
        singular = torch.zeros(batch, dtype=torch.bool, device=device)
        tiny = torch.finfo(b.dtype).eps
        total_iters = 0
        while total_iters < self.max_iters:
            running = torch.isfinite(beta) & (beta > target) & ~singular
            with deliberate_sync(device):
                if not bool(running.any()):
                    break
            cycle = min(self.restart, self.max_iters - total_iters)
            # Per iteration a fixed number of batched ops, whatever j: the basis lives in one
            # buffer (no re-stacking), and the Givens rotations met so far are kept as one
            # (cycle + 1) x (cycle + 1) orthogonal matrix P (rotate a new Hessenberg column
            # with one bmm instead of j pairs of scalar updates); the rotated right-hand side
            # is g = g0 P e_0, so its last entry is the residual estimate.
            slots = torch.arange(cycle + 1, device=device)
            basis = b.new_zeros(batch, cycle + 1, n)
            norm = torch.where(running, row_norm(r), 1)
            basis = _assign(basis, 1, slots[:1], torch.where(running[:, None], r / norm[:, None],
                                                             0).unsqueeze(1))
            rotations = torch.eye(cycle + 1, dtype=b.dtype, device=device).repeat(batch, 1, 1)
            # Row j holds column j of the triangular factor (zero past its diagonal).
            triangle = b.new_zeros(batch, cycle, cycle)
            tail = b.new_zeros(batch, cycle)
            g0 = row_norm(r)
            used = torch.zeros(batch, dtype=torch.int64, device=device)
            scale = torch.zeros(batch, dtype=b.dtype, device=device)  # largest ||A v_j||
            k = 0
            for j in range(cycle):
                w = apply(basis[:, j])
                nmatvec += 1
                scale = torch.maximum(scale, row_norm(w).detach())
                stacked = basis[:, : j + 1]  # (batch, j+1, n)
                # Projections as w^T V^T (batch, 1, j+1): on CPU this bmm orientation is
                # several times faster than V w.
                across = stacked.transpose(1, 2)
                h = torch.bmm(w.unsqueeze(1), across)
                w = w - torch.bmm(h, stacked).squeeze(1)
                h_again = torch.bmm(w.unsqueeze(1), across)
                w = w - torch.bmm(h_again, stacked).squeeze(1)
                h = (h + h_again).squeeze(1)
                h_next = row_norm(w)
                # Breakdown (h_next ~ 0) means the Krylov space is invariant: x is exact there
                # unless the rotated pivot is zero too (then A is singular on that space).
                healthy = h_next > tiny * h.abs().amax(dim=1)
                safe = torch.where(healthy, h_next, 1)
                basis = _assign(basis, 1, slots[j + 1 : j + 2],
                                torch.where(healthy[:, None], w / safe[:, None], 0).unsqueeze(1))
                column = torch.bmm(rotations[:, : j + 1, : j + 1], h.unsqueeze(2)).squeeze(2)
                top = column[:, j]
                # hypot's gradient at (0, 0) is 0/0, which torch.where below would pass back
                # as 0 * NaN (NaN gradients through an Unrolled Newton-Krylov solve)
                both_zero = (top == 0) & (h_next == 0)
                pivot = torch.hypot(torch.where(both_zero, 1, top), h_next)
                pivot = torch.where(both_zero, 0, pivot)
                zero_pivot = running & ~healthy & (pivot.detach() <= 1e3 * tiny * scale)
                # No rotation at a zero pivot (nor where both entries are 0): g[j] stays the
                # (unreduced) residual and the column is not used.
                rotate = (pivot > 0) & ~zero_pivot
                safe = torch.where(rotate, pivot, 1)
                c = torch.where(rotate, top / safe, 1)
                s = torch.where(rotate, h_next / safe, 0)
                diagonal = torch.where(rotate, pivot, top)  # c top + s h_next
                entries = torch.cat((column[:, :j], diagonal.unsqueeze(1), tail[:, j + 1 :]), 1)
                triangle = _assign(triangle, 1, slots[j : j + 1], entries.unsqueeze(1))
                # P <- G_j P: rows j and j+1 mix (row j+1 of P is still e_{j+1}).
                givens = torch.stack((c, s, -s, c), dim=1).view(batch, 2, 2)
                rotations = _assign(rotations, 1, slots[j : j + 2],
                                    torch.bmm(givens, rotations[:, j : j + 2]))
                singular = singular | zero_pivot
                running = running & ~zero_pivot
                used = used + running
                estimate = (g0 * rotations[:, j + 1, 0]).abs().detach()
                running = running & (estimate > target) & torch.isfinite(estimate)
                total_iters += 1
                k = j + 1
                # On CUDA the host asks "is any sample still running?" every few iterations
                # only (finished samples are masked: the same answer, a few more products).
                if (device.type == "cpu" or k % _CHECK_EVERY_WITHOUT_SYNC == 0
                        or k == cycle):
                    with deliberate_sync(device):
                        if not bool(running.any()):
                            break
            index = torch.arange(k, device=device)
            mask = index[None, :] < used[:, None]  # (batch, k): this sample's valid columns
            square = mask[:, :, None] & mask[:, None, :]
            eye = torch.eye(k, dtype=b.dtype, device=device)
            triangle = torch.where(square, triangle[:, :k, :k].transpose(1, 2), eye)
            g = g0[:, None] * rotations[:, :, 0]  # (batch, cycle + 1)
            rhs = torch.where(mask, g[:, :k], 0)
            y = torch.linalg.solve_triangular(triangle, rhs.unsqueeze(2), upper=True).squeeze(2)
            x = x + torch.bmm(y.unsqueeze(1), basis[:, :k]).squeeze(1)
            n_iters = n_iters + used
            estimate = g.abs().detach()
            last = estimate.gather(1, used.unsqueeze(1)).squeeze(1)
            residual_norm = torch.where((used > 0) | singular, last, residual_norm)
            needs_restart = torch.isfinite(last) & (last > target) & ~singular
            with deliberate_sync(device):
                restart = total_iters < self.max_iters and bool(needs_restart.any())
            if restart:
                r = flat_b - apply(x)
                nmatvec += 1
                beta = row_norm(r).detach()
                residual_norm = beta
            else:
                beta = residual_norm
        residual = residual_norm / math.sqrt(n)
        finite = torch.isfinite(residual) & torch.isfinite(x).all(dim=1)
        status = torch.where(
            residual <= target / math.sqrt(n), int(Status.SUCCESS), int(Status.MAX_STEPS)
        )
        status = torch.where(singular, int(Status.SINGULAR), status)
        status = torch.where(finite, status, int(Status.NONFINITE)).to(torch.int64)
        failed = status != int(Status.SUCCESS)
        with deliberate_sync(device):
            recheck = bool(failed.any()) and bool(finite.any())
        if recheck:
            # A failed sample reports its true residual ||b - A x||, not the estimate.
            true = row_norm(flat_b - apply(torch.where(finite[:, None], x, 0))).detach()
            nmatvec += failed.long()
            residual = torch.where(failed & finite, true / math.sqrt(n), residual)
        stats = {"residual": residual, "n_iters": n_iters, "nmatvec": nmatvec}
        return Solution(value=x.reshape(shape), status=status, stats=stats)
