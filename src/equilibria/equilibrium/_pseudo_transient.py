"""Implicit Euler in pseudo-time with residual-driven dt (pseudo-transient continuation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import check_positive, rms_norm
from ..linear import GMRES
from ._newton_krylov import forcing_term, jvp_of
from ._solver import Fn, State, expand_as_batch

__all__ = ["ImplicitEuler"]


def residual_driven_step(state: State, z_new: torch.Tensor, fz_new: torch.Tensor,
                         residual: torch.Tensor, residual_new: torch.Tensor, eta: torch.Tensor,
                         reject_factor: float, dt_max: float) -> State:
    """Accept or reject a pseudo-time step by the residual alone, and the next dt by switched
    evolution relaxation (dt <- min(dt ||r_old|| / ||r_new||, dt_max); a step whose residual
    is non-finite or grew more than `reject_factor`-fold is retried at dt / 4). Shared by
    ImplicitEuler and SteadyState's implicit RK steps: when only the steady state matters."""
    z, fz, t, dt = state["z"], state["fz"], state["t"], state["dt"]
    accept = torch.isfinite(residual_new) & (residual_new <= reject_factor * residual)
    keep = expand_as_batch(accept, z)
    ratio = torch.where(
        residual_new > 0, residual / residual_new, torch.full_like(residual, float("inf"))
    )
    grown = torch.minimum(dt * ratio.to(dt.dtype), torch.full_like(dt, dt_max))
    return {
        "z": torch.where(keep, z_new, z),
        "fz": torch.where(keep, fz_new, fz),
        "t": torch.where(accept, t + dt, t),
        "dt": torch.where(accept, grown, dt / 4),
        "eta": eta,
        "previous": torch.where(accept, residual, state["previous"]),
        "nonfinite_trial": ~torch.isfinite(residual_new),
    }


@dataclass(frozen=True)
class ImplicitEuler:
    """Pseudo-transient continuation: implicit Euler on dz/dt = f(z) - z with growing dt.

    Each step linearises the implicit Euler equation at z and solves, per sample,

        (I/dt + I - df/dz) d = f(z) - z,        z <- z + d,

    with GMRES on Jacobian-vector products (forward mode). The step size follows switched
    evolution relaxation, dt <- min(dt * ||r_old|| / ||r_new||, dt_max): small while the
    residual is large (the iteration follows the flow, keeping the ODE path's robustness:
    it converges whenever the eigenvalues of df/dz have real part < 1) and growing without
    bound as the residual falls, so that the step turns into a Newton step. A step whose
    residual is non-finite or grows more than `reject_factor`-fold is rejected and retried
    from the same z with dt / 4. GMRES's relative tolerance is the Eisenstat–Walker forcing
    term (as in NewtonKrylov), between `linear_solver.rtol` and `eta_max`.

    Like Newton's method (which it becomes), it can also converge to an *unstable* steady
    state: for an eigenvalue mu > 1 of df/dz, a step with dt > 1 / (mu - 1) moves towards the
    equilibrium (f = 2z + 1 from z0 = 0 converges to z = -1 with the default dt0). Use an
    explicit method (SteadyState(Tsit5())) when only attracting equilibria are wanted.

    Use it as ``SteadyState(ImplicitEuler())`` (the default of SteadyState).

    Arguments:
        linear_solver: the GMRES of each linear solve: restart / max_iters bound it, atol is
            the absolute floor, rtol the smallest forcing term (default atol 1e-30).
        dt0: first pseudo-time step (> 0). The default 3 was chosen by measurement on the
            benchmark problems (hard case: 33 batched f/JVP calls against 45 with dt0 = 1;
            easy case 15 against 17); implicit Euler is A-stable, so a larger first step
            is safe on stable flows, and a step that raises the residual is retried smaller.
        dt_max: cap on dt (> 0).
        reject_factor: a step raising the residual more than this factor is rejected (> 1).
        eta_max: the largest forcing term, in [linear_solver.rtol, 1).

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range.

    nfe counts f evaluations and JVPs (and 2 per step for setting up the JVPs, see
    NewtonKrylov). Reference: Kelley & Keyes, "Convergence analysis of
    pseudo-transient continuation", SIAM J. Numer. Anal. 35 (1998); Mulder & van Leer (1985)
    for switched evolution relaxation.
    """

    linear_solver: GMRES = field(
        default_factory=lambda: GMRES(restart=20, max_iters=40, atol=1e-30, rtol=1e-6)
    )
    dt0: float = 3.0
    dt_max: float = 1e8
    reject_factor: float = 2.0
    eta_max: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.linear_solver, GMRES):
            raise TypeError(
                f"linear_solver must be a GMRES(...), got {type(self.linear_solver).__name__}."
            )
        check_positive("dt0", self.dt0)
        check_positive("dt_max", self.dt_max)
        if check_positive("reject_factor", self.reject_factor) <= 1:
            raise ValueError(f"reject_factor must be > 1, got {self.reject_factor}.")
        check_positive("eta_max", self.eta_max)
        if not self.linear_solver.rtol <= self.eta_max < 1:
            raise ValueError(
                f"eta_max must be in [linear_solver.rtol, 1) = [{self.linear_solver.rtol}, 1), "
                f"got {self.eta_max}."
            )

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        residual = rms_norm(fz - z).detach()
        return {
            "z": z,
            "fz": fz,
            "t": torch.zeros_like(residual),
            "dt": torch.full_like(residual, self.dt0),
            "eta": torch.full_like(residual, self.eta_max),
            "previous": residual,
            "nonfinite_trial": torch.zeros_like(residual, dtype=torch.bool),
        }

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, torch.Tensor]:
        z, fz, dt = state["z"], state["fz"], state["dt"]
        g = fz - z
        residual = rms_norm(g).detach()
        eta = state["eta"]
        if step_index > 0:
            eta = forcing_term(
                eta, residual, state["previous"], state["tolerance"], self.linear_solver.rtol,
                self.eta_max,
            )
        jvp, setup = jvp_of(fn, z)
        shift = expand_as_batch((1 / dt + 1).to(z.dtype), z)
        linear = self.linear_solver._solve(
            lambda v: shift * v - jvp(v), g, None, self.linear_solver.atol, eta
        )
        z_new = z + linear.value
        fz_new = fn(z_new)
        residual_new = rms_norm(fz_new - z_new).detach()
        new_state = residual_driven_step(state, z_new, fz_new, residual, residual_new, eta,
                                         self.reject_factor, self.dt_max)
        return new_state, linear.stats["nmatvec"] + 1 + setup
