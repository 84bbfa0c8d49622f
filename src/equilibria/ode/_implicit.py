"""Implicit (stiff) Runge–Kutta steps: ESDIRK stages solved by Newton's method, per sample.

Each implicit stage of an ESDIRK step (see `_esdirk_tableau`) is the nonlinear system

    r(z) = z - psi_i - dt gamma f(t_i, z) = 0,     psi_i = y + dt sum_{j<i} a_ij k_j,

solved per sample by Newton's method with the iteration matrix M = I - dt gamma J:

- dense path (at most `Newton.dense_max` elements per sample): J = df/dy per sample, from
  forward-mode JVPs against the unit vectors (finite differences if f has no forward-mode
  derivative), computed at the step's start and kept across stages and steps while Newton
  converges fast (refreshed for the samples whose Newton was slow or failed); M is
  LU-factored per sample once per step attempt.
- matrix-free path (larger states): each Newton correction solves M d = -r with the
  project's GMRES on finite-difference JVPs at the current iterate (Jacobian-free
  Newton–Krylov).

Newton stops per sample when the contraction-corrected size of its correction,
theta / (1 - theta) ||d|| (theta the ratio of successive corrections; ||.|| the RMS of
d / (atol + rtol |z|)), is below kappa (Hairer's criterion); it fails when theta >= 1, a value
is non-finite or max_iters is used up. A failure is that sample's outcome only: odeint
rejects its step, refreshes its Jacobian and shrinks its dt.

Gradients (Backprop): the stage is solved without a graph, then its implicit derivative is
attached: dz = M(z)^{-1} (dpsi + dt gamma df/dtheta dtheta), with M(z)^{-T} applied in the
backward pass by GMRES on VJPs at the converged z — the derivative of the implicit
equation, not of the Newton iterations (the rule the DEQ backward follows).

References: Hairer & Wanner, *Solving ODEs II* (2nd ed.), IV.8 (Newton for implicit RK:
stopping criterion, Jacobian reuse); Kennedy & Carpenter, NASA/TM-2016-219173, §2;
Knoll & Keyes, "Jacobian-free Newton–Krylov methods", J. Comput. Phys. 193 (2004).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .._checks import check_positive, check_positive_int, rms_norm
from ..linear import GMRES
from ._esdirk_tableau import KVAERNO3, KVAERNO5, ESDIRKTableau
from ._rk import _batch_view, _weighted_sum, time_like

__all__ = ["ImplicitRK", "Kvaerno3", "Kvaerno5", "Newton", "esdirk_stages"]


@dataclass(frozen=True)
class Newton:
    """Newton's method for the implicit stages (per sample).

    Arguments:
        max_iters: corrections per stage before the attempt counts as failed (>= 1).
        kappa: stop when theta / (1 - theta) ||d|| <= kappa, ||.|| in units of the local
            error tolerance; None: max(10 eps / rtol, min(0.03, sqrt(rtol))) (Hairer's
            choice for Radau5; the floor keeps the test above the rounding of z).
        dense_max: states with at most this many elements per sample use the dense LU path,
            larger ones the matrix-free GMRES path (>= 0; 0 forces matrix-free).
        linear_solver: the GMRES of the matrix-free path (its rtol is relative to ||r||;
            an inexact Newton: a loose 0.1 is enough because the stopping test measures the
            corrections, which are small only once the residual is).
        refresh: recompute a sample's Jacobian (dense path) after a step whose largest
            contraction rate theta exceeded this (in (0, 1)).

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range.
    """

    max_iters: int = 10
    kappa: float | None = None
    dense_max: int = 64
    linear_solver: GMRES = field(
        default_factory=lambda: GMRES(restart=30, max_iters=60, atol=1e-30, rtol=1e-1)
    )
    refresh: float = 0.01

    def __post_init__(self) -> None:
        check_positive_int("Newton.max_iters", self.max_iters)
        if self.kappa is not None:
            check_positive("Newton.kappa", self.kappa)
        check_positive_int("Newton.dense_max", self.dense_max, minimum=0)
        if not isinstance(self.linear_solver, GMRES):
            raise TypeError(
                f"Newton.linear_solver must be a GMRES(...), got "
                f"{type(self.linear_solver).__name__}."
            )
        if not 0 < self.refresh < 1:
            raise ValueError(f"Newton.refresh must be in (0, 1), got {self.refresh!r}.")

    def tolerance(self, rtol: float, dtype: torch.dtype) -> float:
        if self.kappa is not None:
            return self.kappa
        return max(10 * torch.finfo(dtype).eps / rtol, min(0.03, math.sqrt(rtol)))


class ImplicitRK:
    """Base of the implicit solver objects: an ESDIRK tableau and its Newton options."""

    tableau: ESDIRKTableau
    newton: Newton

    adaptive: ClassVar[bool] = True

    @property
    def order(self) -> int:
        return self.tableau.order

    def __post_init__(self) -> None:
        if not isinstance(self.newton, Newton):
            raise TypeError(
                f"{type(self).__name__}(newton=...) needs a Newton(...), got "
                f"{type(self.newton).__name__}."
            )


@dataclass(frozen=True)
class Kvaerno3(ImplicitRK):
    """Kværnø's ESDIRK 3(2): 4 stages (3 implicit), L-stable, stiffly accurate; for stiff
    problems at moderate tolerances (rtol >= 1e-6). Dense output by cubic Hermite.

    Arguments:
        newton: the `Newton` options of the stage solves.
    """

    tableau: ClassVar[ESDIRKTableau] = KVAERNO3
    newton: Newton = field(default_factory=Newton)


@dataclass(frozen=True)
class Kvaerno5(ImplicitRK):
    """Kværnø's ESDIRK 5(4): 7 stages (6 implicit), L-stable, stiffly accurate; for stiff
    problems at tight tolerances. Dense output by cubic Hermite. (Two of its nodes lie
    outside [0, 1]: f is evaluated up to t + 1.23 dt.)

    Arguments:
        newton: the `Newton` options of the stage solves.
    """

    tableau: ClassVar[ESDIRKTableau] = KVAERNO5
    newton: Newton = field(default_factory=Newton)


def _jacobian(f: Callable, t: torch.Tensor, y: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """(rows, n, n) df/dy per sample: forward-mode JVPs against the n unit vectors (batched by
    vmap), or forward differences where f has no forward-mode derivative."""
    rows, n = y.shape[0], y[0].numel()
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    basis = eye[:, None, :].expand(n, rows, n).reshape((n,) + tuple(y.shape))
    try:
        columns = torch.func.vmap(lambda v: torch.func.jvp(lambda z: f(t, z), (y,), (v,))[1])(
            basis
        )
    except Exception:  # noqa: BLE001  (any op without a forward-mode rule: use differences)
        scale = y.abs().reshape(rows, n).clamp_min(1.0)
        steps = math.sqrt(torch.finfo(y.dtype).eps) * scale  # (rows, n)
        cols = []
        for i in range(n):
            h = steps[:, i]
            shifted = y.reshape(rows, n).clone()
            shifted[:, i] += h
            cols.append(((f(t, shifted.reshape(y.shape)) - fy).reshape(rows, n)) / h[:, None])
        return torch.stack(cols, dim=2)
    return columns.reshape(n, rows, n).permute(1, 2, 0)


class _StageDerivative(torch.autograd.Function):
    """Value 0 (the stage's graph-free z carries the value); backward applies M(z)^{-T}, the
    transposed iteration matrix at the converged stage, so that
    z = z* + solve(w - w.detach()) has dz = M^{-1} dw with w = psi + dt gamma f(t_i, z*)."""

    @staticmethod
    def forward(ctx, rhs, f, t_i, z, hg, solver):
        ctx.stuff = (f, t_i, z, hg, solver)
        return torch.zeros_like(rhs)

    @staticmethod
    def backward(ctx, grad):
        f, t_i, z, hg, solver = ctx.stuff
        with torch.enable_grad():
            point = z.detach().requires_grad_(True)
            value = f(t_i, point)

            def transposed(u: torch.Tensor) -> torch.Tensor:
                (vjp,) = torch.autograd.grad(value, point, u, retain_graph=True,
                                             allow_unused=True)
                vjp = torch.zeros_like(u) if vjp is None else vjp
                return u - hg * vjp

            sol = solver._solve(transposed, grad, None, solver.atol, solver.rtol)
        return sol.value, None, None, None, None, None


def _attach_derivative(f, t_i, z, psi, hg, n, newton):
    """z with the implicit derivative of its stage equation attached (see the module doc);
    returns (z, extra evaluations of f)."""
    fz = f(t_i, z)
    w = psi + hg * fz
    if not w.requires_grad:
        return z, 1
    # small states: GMRES is exact in n iterations; large ones: a tight relative tolerance
    solver = (GMRES(restart=n, max_iters=2 * n, atol=1e-300, rtol=1e-13) if n <= newton.dense_max
              else GMRES(restart=newton.linear_solver.restart, max_iters=20 * n, atol=1e-300,
                         rtol=1e-10))
    return z + _StageDerivative.apply(w - w.detach(), f, t_i, z, hg, solver), 1


def esdirk_stages(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t: torch.Tensor,
    y: torch.Tensor,
    dt: torch.Tensor,
    solver: ImplicitRK,
    k1: torch.Tensor,
    rtol: float,
    atol: float,
    jacobian: torch.Tensor | None = None,
    refresh: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor,
           torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One ESDIRK step of size dt[b] for every sample b (dt = 0: the sample sits still).

    Arguments:
        f: vector field f(t, y), t of shape (batch, 1, ..., 1).
        t: (batch,) float64 times; y: (batch, ...) states; dt: (batch,) float64 steps.
        solver: Kvaerno3(), Kvaerno5() (its tableau and Newton options).
        k1: (batch, ...) f(t, y).
        rtol, atol: the local error tolerances (they scale Newton's stopping test).
        jacobian: (batch, n, n) the Jacobians kept from earlier steps (dense path), or None.
        refresh: (batch,) bool, which samples need a fresh Jacobian (None: all).
        eta: (batch,) float64 theta / (1 - theta) of each sample's latest Newton solve (None:
            1), so that a first correction already below the tolerance can stop Newton
            (Hairer's max(eta, eps)^0.8 at the start of a step).

    Returns:
        (y_new, y_err, stages, nfe, converged, jacobian, theta, eta): y_new and the local error
        estimate dt sum b_err_i k_i (batch, ...); the s stage derivatives (k_s is f at y_new);
        nfe (batch,) int64 evaluations of f per sample (Jacobian columns and GMRES products
        included); converged (batch,) bool (Newton converged in every stage); the Jacobians
        (None on the matrix-free path); theta (batch,) the largest contraction rate seen;
        eta (batch,) to pass to the next step.
    """
    tab, newton = solver.tableau, solver.newton
    rows, n = y.shape[0], y[0].numel()
    dtype, device = y.dtype, y.device
    dense = n <= newton.dense_max
    kappa = newton.tolerance(rtol, dtype)
    dt_b = _batch_view(dt.to(dtype), y)
    hg = dt_b * tab.gamma
    safe_hg = torch.where(hg == 0, torch.ones_like(hg), hg)
    t_b = time_like(t, y)
    moving = dt != 0
    nfe = torch.zeros(rows, dtype=torch.int64, device=device)
    converged = torch.ones(rows, dtype=torch.bool, device=device)
    theta_max = torch.zeros(rows, dtype=torch.float64, device=device)
    eta = (torch.ones(rows, dtype=torch.float64, device=device) if eta is None
           else eta.clamp_min(torch.finfo(dtype).eps).pow(0.8))
    lu = None
    if dense:
        with torch.no_grad():
            need = moving if refresh is None else refresh & moving
            if jacobian is None:
                jacobian = y.new_zeros(rows, n, n)
                need = moving
            if bool(need.any()):
                fresh = _jacobian(f, t_b, y.detach(), k1.detach())
                jacobian = torch.where(need[:, None, None], fresh, jacobian)
                nfe += need.long() * n
            matrix = torch.eye(n, dtype=dtype, device=device) - hg.reshape(rows, 1, 1) * jacobian
            lu = torch.linalg.lu_factor(matrix)
    stages = [k1]
    z = None
    for i in range(1, tab.n_stages):
        psi_incr = _weighted_sum(stages, tab.a[i][:i])
        psi = y if psi_incr is None else torch.addcmul(y, dt_b, psi_incr)
        t_i = t_b + tab.c[i] * dt_b
        with torch.no_grad():
            guess = psi + hg * stages[-1]
            z, used, ok, theta, eta = _newton(f, t_i, guess, psi.detach(), hg,
                                              moving & converged, lu, newton, kappa, rtol,
                                              atol, eta)
        nfe += used
        converged &= ok | ~moving
        theta_max = torch.maximum(theta_max, theta)
        if torch.is_grad_enabled():
            z, extra = _attach_derivative(f, t_i, z, psi, hg, n, newton)
            nfe += extra * moving.long()
        stages.append((z - psi) / safe_hg)
    y_new = z
    y_err = dt_b * _weighted_sum(stages, tab.b_err)
    return y_new, y_err, stages, nfe, converged, jacobian, theta_max, eta


def _newton(f, t_i, z, psi, hg, iterating, lu, newton, kappa, rtol, atol, eta):
    """Newton on z - psi - hg f(t_i, z) = 0 for the rows in `iterating` (no graph).

    Returns (z, nfe per row, converged per row, largest theta per row, eta per row)."""
    rows = z.shape[0]
    shape = z.shape
    device = z.device
    nfe = torch.zeros(rows, dtype=torch.int64, device=device)
    done = ~iterating
    converged = ~iterating
    previous = torch.full((rows,), float("inf"), dtype=torch.float64, device=device)
    theta_max = torch.zeros(rows, dtype=torch.float64, device=device)
    for iteration in range(newton.max_iters):
        running = ~done
        if not bool(running.any()):
            break
        fz = f(t_i, z)
        nfe += running.long()
        residual = z - psi - hg * fz
        residual = torch.where(_batch_view(running, z), residual, torch.zeros_like(residual))
        residual = torch.nan_to_num(residual, nan=0.0, posinf=0.0, neginf=0.0)
        if lu is not None:
            delta = -torch.linalg.lu_solve(*lu, residual.reshape(rows, -1, 1)).reshape(shape)
        else:
            delta, products = _krylov_correction(f, t_i, z, fz, residual, hg, newton)
            nfe += products * running.long()
        size = rms_norm(delta / z.abs().mul(rtol).add(atol)).double()
        finite = torch.isfinite(size) & torch.isfinite(fz.reshape(rows, -1).sum(dim=1))
        z = torch.where(_batch_view(running & finite, z), z + delta, z)
        if iteration == 0:
            theta = torch.zeros_like(size)
            ok = eta * size <= kappa
        else:
            theta = torch.where(previous > 0, size / previous, torch.zeros_like(size))
            rate = theta / (1 - theta).clamp_min(1e-12)
            eta = torch.where(running & (theta < 1), rate, eta)
            ok = (theta < 1) & (rate * size <= kappa)
            ok |= size == 0
        theta_max = torch.where(running, torch.maximum(theta_max, theta), theta_max)
        diverged = running & (~finite | ((theta >= 1) & (iteration > 0)))
        newly = running & finite & ok
        converged |= newly
        done |= newly | diverged
        previous = torch.where(running, size, previous)
    return z, nfe, converged, theta_max, eta


def _krylov_correction(f, t_i, z, fz, residual, hg, newton):
    """d with (I - hg J(z)) d = -residual by GMRES on forward-difference JVPs of f at z."""
    eps = math.sqrt(torch.finfo(z.dtype).eps)
    base = 1.0 + rms_norm(z)  # (rows,)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        size = rms_norm(v)
        step = torch.where(size > 0, eps * base / size.clamp_min(1e-300), torch.ones_like(size))
        step_b = _batch_view(step, v)
        jv = (f(t_i, z + step_b * v) - fz) / step_b
        return v - hg * jv

    linear = newton.linear_solver
    sol = linear._solve(matvec, -residual, None, linear.atol, linear.rtol)
    return sol.value, sol.stats["nmatvec"]
