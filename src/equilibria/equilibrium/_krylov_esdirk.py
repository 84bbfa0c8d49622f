"""An ESDIRK step for the steady state: linearly implicit, every stage in one Krylov space.

`SteadyState(Kvaerno3())` integrates dz/dt = F(z) = f(z) - z only to reach F(z*) = 0; the
accuracy of the transient does not matter. Solving each implicit stage by Newton–Krylov (as
odeint does) spends, at the huge steps a steady-state search takes, one Newton solve of the
whole problem per stage: measured on the equilibrium benchmark's hard case, 3 stages x up to
6 Newton iterations x up to 8 JVPs a step (324 evaluations in 6 steps, 11.6x Anderson's).

Here a step linearises F at the step's start y and projects the Jacobian J = dF/dz onto the
Krylov space K_m = span{F(y), J F(y), ..., J^{m-1} F(y)} (Arnoldi: J V_m = V_{m+1} H̄): a
Krylov-W method (Schmitt & Weiner 1995) with the ESDIRK's tableau. Every stage right-hand
side of the linearised problem lies in K_m, so all stages cost one small (m x m) solve each
with the same matrix I - dt gamma H: m JVPs a step in all, whatever the number of stages,
where Newton–Krylov per stage spends m JVPs per Newton iteration per stage. The step is then
the ESDIRK's stability function applied to the projected linear flow,
y_new = y + V_m c, c = (R(dt H) - I) H^{-1} ||F(y)|| e_1, and, the methods being L-stable,
it tends to the (inexact) Newton step y - J^{-1} F(y) as dt grows: pseudo-transient
continuation with the ESDIRK's damping of the fast modes in place of implicit Euler's.

The dimension m grows per sample until the minimal residual of (I - dt gamma J) x = F(y)
in K_m is below the forcing term eta ||F(y)|| (inexact Newton, Eisenstat–Walker: loose while
the residual is large, tighter as it falls). Nonlinearity is left to the caller's test of
the true residual at y_new (a step whose residual grew is rejected).

Reference: Schmitt & Weiner, "Matrix-free W-methods using a multiple Arnoldi iteration",
Appl. Numer. Math. 18 (1995); Kelley & Keyes, SIAM J. Numer. Anal. 35 (1998).
"""

from __future__ import annotations

import torch

from .._checks import deliberate_sync, row_norm
from ..linear._gmres import _assign
from ..ode._esdirk_tableau import ESDIRKTableau
from ._newton_krylov import jvp_of
from ._solver import Fn

__all__ = ["krylov_esdirk_step"]


def krylov_esdirk_step(
    fn: Fn, z: torch.Tensor, g: torch.Tensor, dt: torch.Tensor, tableau: ESDIRKTableau,
    eta: torch.Tensor, max_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linearly implicit ESDIRK step of dz/dt = f(z) - z per sample, on a Krylov space.

    Arguments:
        fn: f on the state's rows.
        z: (batch, ...) the step's start; g: (batch, ...) f(z) - z there.
        dt: (batch,) float64 step sizes; tableau: the ESDIRK tableau (Kvaerno3/5's).
        eta: (batch,) relative tolerance of the shifted linear system (the forcing term).
        max_dim: the largest Krylov dimension (JVPs) per step.

    Returns:
        (z_new, nfe): the new state (batch, ...); evaluations per sample (batch,) int64: the
        JVPs this sample used plus the JVP set-up's (2 under no_grad, see `jvp_of`).
    """
    rows, shape = z.shape[0], z.shape
    flat = g.reshape(rows, -1)
    n = flat.shape[1]
    dtype, device = z.dtype, z.device
    jvp, setup = jvp_of(fn, z)
    beta = row_norm(flat)
    hg = dt.to(torch.float64) * tableau.gamma  # (rows,)
    limit = min(max_dim, n)
    slots = torch.arange(limit + 1, device=device)
    basis = z.new_zeros(rows, limit + 1, n)
    start = flat / torch.where(beta > 0, beta, 1)[:, None]
    basis = _assign(basis, 1, slots[:1], start.unsqueeze(1))
    columns: list[torch.Tensor] = []  # Hessenberg columns, (rows, limit + 1) float64 each
    running = beta > 0
    dims = torch.zeros(rows, dtype=torch.int64, device=device)
    nfe = torch.full((rows,), setup, dtype=torch.int64, device=device)
    target = eta.to(torch.float64) * beta.detach().to(torch.float64)
    rhs = torch.zeros(rows, limit + 1, 1, dtype=torch.float64, device=device)
    rhs[:, 0, 0] = beta.detach().double()
    tiny = torch.finfo(dtype).eps
    for j in range(limit):
        with deliberate_sync(device):  # the one host read of an iteration, as GMRES's
            if not bool(running.any()):
                break
        v = basis[:, j]
        # F = f - I: J_F v = J_f v - v (the Krylov space of J_F is that of J_f)
        w = jvp(v.reshape(shape)).reshape(rows, n) - v
        nfe += running.long()
        dims += running.long()
        stacked = basis[:, : j + 1]
        across = stacked.transpose(1, 2)
        h = torch.bmm(w.unsqueeze(1), across)
        w = w - torch.bmm(h, stacked).squeeze(1)
        again = torch.bmm(w.unsqueeze(1), across)  # classical Gram-Schmidt twice
        w = w - torch.bmm(again, stacked).squeeze(1)
        h = (h + again).squeeze(1)
        h_next = row_norm(w)
        healthy = h_next > tiny * h.abs().amax(dim=1).clamp_min(tiny)
        safe = torch.where(healthy, h_next, 1)
        basis = _assign(basis, 1, slots[j + 1 : j + 2],
                        torch.where(healthy[:, None], w / safe[:, None], 0).unsqueeze(1))
        column = torch.cat((h, torch.where(healthy, h_next, 0).unsqueeze(1)), dim=1).double()
        padding = column.new_zeros(rows, limit - j - 1)
        columns.append(torch.where(running[:, None], torch.cat((column, padding), dim=1), 0))
        # the minimal residual of (I - hg J) x = beta e1 over K_{j+1}, per sample: a small
        # QR, ||rhs - Q Q^T rhs|| (not ||rhs||^2 - ||Q^T rhs||^2, which cancels to 0 below
        # ~1e-8 relative)
        hessenberg = torch.stack(columns, dim=2)[:, : j + 2].detach()
        shifted = -hg.detach()[:, None, None] * hessenberg
        shifted[:, : j + 1] += torch.eye(j + 1, dtype=torch.float64, device=device)
        q, _ = torch.linalg.qr(shifted)
        projected = torch.bmm(q.transpose(1, 2), rhs[:, : j + 2])
        residual = (rhs[:, : j + 2] - torch.bmm(q, projected)).norm(dim=(1, 2))
        running = running & healthy & (residual > target)
    if not columns:  # every residual is zero: nothing moves
        return z, nfe
    hessenberg = torch.stack(columns, dim=2)
    coefficients = _stages(tableau, hessenberg, dims, beta, dt)
    m = hessenberg.shape[2]
    step = torch.bmm(coefficients[:, None, :m].to(dtype), basis[:, :m]).squeeze(1)
    return z + step.reshape(shape), nfe


def _stages(tableau: ESDIRKTableau, hessenberg: torch.Tensor, dims: torch.Tensor,
            beta: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The ESDIRK on the projected linear flow dc/dt = beta e1 + H c, c(0) = 0, in float64.

    Each sample uses its own leading dims[b] x dims[b] block of H (the rest zeroed: those
    coordinates stay 0). Returns c at the step's end (the last stage: the methods are
    stiffly accurate), (batch, m)."""
    rows, m = hessenberg.shape[0], hessenberg.shape[2]
    index = torch.arange(m, device=hessenberg.device)
    valid = index[None, :] < dims[:, None]
    square = valid[:, :, None] & valid[:, None, :]
    h = torch.where(square, hessenberg[:, :m, :m], 0)
    eye = torch.eye(m, dtype=torch.float64, device=h.device)
    hg = (dt.to(torch.float64) * tableau.gamma)[:, None]
    dt_b = dt.to(torch.float64)[:, None]
    lu = torch.linalg.lu_factor(eye - hg[:, :, None] * h)
    first = torch.zeros(rows, m, dtype=torch.float64, device=h.device)
    if m:
        first[:, 0] = torch.where(dims > 0, beta.double(), 0)
    stages = [first]
    c = torch.zeros_like(first)
    for i in range(1, tableau.n_stages):
        psi = dt_b * sum(tableau.a[i][j] * stages[j] for j in range(i))
        c = torch.linalg.lu_solve(*lu, (psi + hg * first).unsqueeze(2)).squeeze(2)
        stages.append(first + torch.bmm(h, c.unsqueeze(2)).squeeze(2))
    return c
