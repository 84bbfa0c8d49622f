"""One explicit Runge–Kutta step, batched, with a per-sample step size.

Convention for every vector field in equilibria.ode: ``f(t, y) -> dy/dt`` where ``y`` has shape
(batch, ...) and ``t`` is a tensor of shape (batch, 1, ..., 1) (y's number of dims) with y's
dtype: every sample carries its own time, because every sample takes its own steps, and the
shape broadcasts against y, so a field written for a scalar time (``torch.sin(t) * y``, as in
torchdiffeq) is right as it stands. ``t.reshape(-1)`` gives the (batch,) vector when a field
needs one (e.g. to index a table). ``f`` must treat rows independently (row b of the output
depends only on row b of the input), which is what lets the integrator drop finished samples
from the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._tableau import ButcherTableau

__all__ = ["rk_stages", "rk_step", "time_like"]

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batch_view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch,) -> (batch, 1, ..., 1) to broadcast against `like`."""
    return x.reshape((-1,) + (1,) * (like.dim() - 1))


def time_like(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-sample time, (batch,) or (batch, 1, ..., 1), as the (batch, 1, ..., 1) tensor in
    y's dtype that vector fields receive (the convention of this module's docstring)."""
    return t.to(y.dtype).reshape((y.shape[0],) + (1,) * (y.dim() - 1))


def _weighted_sum(ks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor | None:
    """sum_j weights[j] * ks[j], skipping zero weights; None when all weights are zero.

    A chain of elementwise fused ``add(alpha=)`` rather than one tensordot over stacked
    stages: the elementwise chain rounds identically whatever the batch size, so dropping
    finished samples from the batch cannot change a sample's result (a BLAS reduction
    picks size-dependent kernels and changes the last bits).
    """
    out = None
    for k, w in zip(ks, weights):
        if w == 0.0:
            continue
        out = k * w if out is None else out.add(k, alpha=w)
    return out


def _advance(open_sums: torch.Tensor | None, column: torch.Tensor | None, k: torch.Tensor
             ) -> torch.Tensor | None:
    """The open sums once stage k is in: the row the previous stage consumed dropped, k
    times its column of weights added (None: every weight so far zero)."""
    if open_sums is None:
        return None if column is None else column * k
    rest = open_sums[1:]
    return rest if column is None else torch.addcmul(rest, column, k)


def rk_stages(
    f: VectorField,
    t: torch.Tensor,
    y: torch.Tensor,
    dt: torch.Tensor,
    tableau: ButcherTableau,
    k1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor], int]:
    """All stages of one step; see `rk_step`. Returns (y_new, y_err, stages, nfe).

    ``stages`` is the list of the s stage derivatives k_i (what dense output needs).

    Every weighted sum of stages still open is advanced at once when a stage arrives: one
    ``addcmul`` of the stage times its column of weights into the stacked open sums (one
    call per stage instead of one per nonzero weight). Each sum still accumulates its terms
    in stage order, elementwise, so it rounds exactly as the weight-by-weight chain
    (`_weighted_sum`) whatever the batch size, and dropping finished samples from the batch
    cannot change a sample's result (a BLAS reduction over stacked stages would pick
    size-dependent kernels).
    """
    dt_y = dt.to(y.dtype)
    dt_b = _batch_view(dt_y, y)
    t_f = time_like(t, y)
    s = tableau.n_stages
    columns = tableau.stage_columns(y.dtype, y.device, y.dim())
    nfe = 0
    if k1 is None:
        k1 = f(t_f, y)
        nfe += 1
    ks = [k1]
    y_last = y
    open_sums = None  # (sums still open, batch, ...): row 0 is the next stage's increment
    for i in range(1, s):
        open_sums = _advance(open_sums, columns[i - 1], ks[-1])
        y_i = y if open_sums is None else torch.addcmul(y, dt_b, open_sums[0])
        k_i = f(torch.add(t_f, dt_b, alpha=tableau.c[i]), y_i)
        nfe += 1
        ks.append(k_i)
        y_last = y_i
    # what is left once the last stage is in: sum b_l k_l (unless FSAL) and sum b_err_l k_l
    open_sums = _advance(open_sums, columns[s - 1], ks[-1])
    if open_sums is None:  # every weight zero
        open_sums = torch.zeros_like(y).unsqueeze(0)
    if tableau.fsal:
        # The last stage was evaluated at y + dt * sum b_j k_j: that *is* y_new, bit for bit.
        y_new = y_last
    else:
        y_new = torch.addcmul(y, dt_b, open_sums[0])
    y_err = None
    if tableau.b_err is not None:
        y_err = dt_b * open_sums[-1]
    return y_new, y_err, ks, nfe


def rk_step(
    f: VectorField,
    t: torch.Tensor,
    y: torch.Tensor,
    dt: torch.Tensor,
    tableau: ButcherTableau,
    k1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """One explicit Runge–Kutta step of size dt[b] for every sample b.

        k_i = f(t + c_i dt, y + dt sum_{j<i} a_ij k_j),   y_new = y + dt sum_i b_i k_i,
        y_err = dt sum_i (b_i - b_hat_i) k_i   (embedded error estimate).

    Differentiable with autograd (Backprop through steps). dt may be negative (integration
    backwards in time) and may differ per sample; a sample with dt = 0 is returned unchanged.

    Arguments:
        f: vector field ``f(t, y)``, t of shape (batch, 1, ..., 1) (broadcasts against y),
            y of shape (batch, ...); returns dy/dt with y's shape and dtype.
        t: (batch,) current time of each sample.
        y: (batch, ...) current state.
        dt: (batch,) step size of each sample.
        tableau: the method's `ButcherTableau` (e.g. ``Tsit5().tableau``).
        k1: optional f(t, y) already known (from the previous step of an FSAL method).

    Returns:
        (y_new, y_err, k_last, nfe): the new state (batch, ...); the local error estimate
        (batch, ...) or None for a tableau without an embedded pair; for an FSAL tableau
        k_last = f(t + dt, y_new), to pass as ``k1`` to the next step (None otherwise);
        nfe, the number of evaluations of f made (an int; each evaluates the whole batch).

    Raises:
        ValueError: when t or dt is not of shape (batch,).
    """
    if not isinstance(y, torch.Tensor) or y.dim() < 1:
        raise ValueError("rk_step: y must be a tensor of shape (batch, ...).")
    for name, value in (("t", t), ("dt", dt)):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (y.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise ValueError(
                f"rk_step: {name} must be a tensor of shape (batch,) = ({y.shape[0]},), got "
                f"{shape}; use torch.full((batch,), value)."
            )
    y_new, y_err, ks, nfe = rk_stages(f, t, y, dt, tableau, k1)
    k_last = ks[-1] if tableau.fsal else None
    return y_new, y_err, k_last, nfe
