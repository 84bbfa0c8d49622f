"""Per-sample backtracking on the residual norm, shared by Broyden and NewtonKrylov."""

from __future__ import annotations

import torch

from .._checks import rms_norm
from ._solver import Fn, expand_as_batch

__all__ = ["backtrack"]


def backtrack(
    fn: Fn,
    z: torch.Tensor,
    direction: torch.Tensor,
    residual: torch.Tensor,
    alphas: tuple[float, ...],
    sufficient: float,
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Try z + alpha * direction for alpha in `alphas` until the residual falls enough.

    A sample accepts the first alpha with ||g(z + alpha d)|| <= (1 - sufficient * alpha) ||g(z)||
    (g = f - z, RMS norm). Retries evaluate f only on the samples that still fail.

    Arguments:
        fn: f on the state's rows (``fn(z)``) or on a subset of them (``fn(z_sub, rows)``).
        z, direction: (batch, ...) current iterate and search direction.
        residual: (batch,) ||g(z)||.
        alphas: decreasing step lengths, the first usually 1.
        sufficient: the decrease constant (e.g. 1e-4; 0 asks only for no increase).
        first: (z + alphas[0] direction, f of it, which samples accept it) when the caller
            evaluated and tested the first trial already.

    Returns:
        (z_new, fz_new, residual_new, accepted, nfe, alpha): for samples that found no
        acceptable alpha, the finite trial with the lowest residual (or the last trial when
        none is finite), with accepted False; nfe (batch,) int64 evaluations made per
        sample; alpha (batch,) the step length of the trial returned, in z's dtype.
    """
    alpha = alphas[0]
    if first is None:
        z_new = z + alpha * direction
        fz_new = fn(z_new)
        residual_new = rms_norm(fz_new - z_new).detach()
        accepted = torch.isfinite(residual_new) & (
            residual_new <= (1 - sufficient * alpha) * residual)
    else:
        z_new, fz_new, accepted = first
        residual_new = rms_norm(fz_new - z_new).detach()
    nfe = torch.ones_like(residual, dtype=torch.int64)
    lengths = torch.full_like(residual, alpha, dtype=z.dtype)
    for alpha in alphas[1:]:
        if bool(accepted.all()):
            break
        rows = (~accepted).nonzero().flatten()
        z_try = z.index_select(0, rows) + alpha * direction.index_select(0, rows)
        fz_try = fn(z_try, rows)
        residual_try = rms_norm(fz_try - z_try).detach()
        old = residual_new.index_select(0, rows)
        passes = torch.isfinite(residual_try) & (
            residual_try <= (1 - sufficient * alpha) * residual.index_select(0, rows)
        )
        better = passes | (torch.isfinite(residual_try) & ~(residual_try >= old))
        keep = expand_as_batch(better, z_try)
        z_new = z_new.index_copy(0, rows, torch.where(keep, z_try, z_new.index_select(0, rows)))
        fz_new = fz_new.index_copy(
            0, rows, torch.where(keep, fz_try, fz_new.index_select(0, rows))
        )
        residual_new = residual_new.index_copy(0, rows, torch.where(better, residual_try, old))
        accepted = accepted.index_copy(0, rows, passes)
        lengths = lengths.index_copy(
            0, rows, torch.where(better, alpha, lengths.index_select(0, rows)))
        nfe = nfe.index_add(0, rows, torch.ones_like(rows))
    return z_new, fz_new, residual_new, accepted, nfe, lengths
