"""SteadyState: the continuous DEQ, integrating dz/dt = f(z, x) - z until it stops moving."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import check_positive, rms_norm
from ..ode import ImplicitRK, RungeKutta, rk_step
from ._krylov_esdirk import krylov_esdirk_step
from ._newton_krylov import forcing_term
from ._pseudo_transient import ImplicitEuler, residual_driven_step
from ._solver import FixedPointSolver, Fn, State, expand_as_batch

__all__ = ["SteadyState"]

# The implicit (ESDIRK) branch: bounds of the Eisenstat–Walker forcing term of its Krylov
# space and the cap on dt (ImplicitEuler's, but eta <= 0.1: at 0.5 a one-vector space met
# the test at small dt and the residual crawled, falling ~2% a step for 20 steps on
# tests/test_steady_state_implicit.py's problem; 0.1 took 11-18 steps there, 181 -> 142
# evaluations, and the same on the benchmark's hard case).
_ETA_MIN, _ETA_MAX = 1e-6, 0.1
_DT_MAX = 1e8

_CHOICES = (
    "eq.ImplicitEuler() (default), an implicit ESDIRK method (eq.Kvaerno3(), eq.Kvaerno5()), "
    "or an explicit RK method: eq.Tsit5(), eq.Dopri5(), ..."
)


@dataclass(frozen=True)
class SteadyState(FixedPointSolver):
    """The fixed point as the steady state of the neural ODE dz/dt = f(z, x) - z.

    Integrates the ODE from z0 in pseudo-time t; a sample stops when its residual passes
    fixed_point's test ||f(z, x) - z|| <= atol + rtol ||z|| (this residual *is* ||dz/dt||).
    The flow converges whenever the eigenvalues of df/dz at z* have real part < 1, where
    Picard needs modulus < 1. ``stats["t"]`` is the pseudo-time each sample reached.

    Three kinds of method:

    - `ImplicitEuler` (default): pseudo-transient continuation (implicit Euler steps solved
      with GMRES on JVPs, dt grown as the residual falls until the step is Newton's). Not
      limited by stability, so its step grows without bound near the steady state. Chosen
      as the default by measurement (benchmarks/results/equilibrium.md): on the hard case
      (spectrum of df/dz up to 0.99) it needs about 1.5x the evaluations of Anderson,
      JVPs included, where Tsit5 needs about 11x, held at its stability limit.
    - an explicit Runge–Kutta method from `equilibria.ode` (Tsit5, Dopri5, Bosh3, ... or a
      fixed-step one: Euler, RK4): each step is `equilibria.ode.rk_step`; adaptive methods
      use the embedded error estimate with this object's ``rtol``/``atol`` (a step is accepted
      when the RMS of err / (atol + rtol max(|z|, |z_new|)) is <= 1, and
      dt <- dt * clip(0.9 err^(-1/(q+1)), 0.2, 10)), and, because the residual is dz/dt, a
      step whose residual grew more than 2-fold is rejected too. Near the steady state the
      error estimate shrinks with the residual, so dt grows until it reaches the edge of the
      method's stability region on the spectrum of df/dz - I; a rejected dt then caps the
      following ones (0.9 of it, relaxed by 1.05 per accepted step) so the controller sits
      just inside that edge instead of being rejected over and over. Explicit methods stay
      stability-limited on stiff spectra (measured in benchmarks/results/equilibrium.md).
      Fixed-step methods step with dt0.
    - an implicit ESDIRK method (`Kvaerno3`, `Kvaerno5`), used for the steady state only:
      each step is linearly implicit on one Krylov space (`_krylov_esdirk`: the Jacobian of
      f(z) - z at the step's start projected on K_m(J, f(z) - z) by Arnoldi, all stages
      solved there as m x m systems, m grown until the shifted system's residual is below
      an Eisenstat–Walker forcing term), so a step costs m JVPs whatever the number of
      stages. dt follows the residual as ImplicitEuler's (switched evolution relaxation,
      dt <- dt ||r_old|| / ||r_new||, at most 1e8); a step whose residual grew more than
      2-fold is rejected and retried with dt / 4. The L-stable methods' steps tend to
      inexact Newton steps as dt grows. The local error estimate is not used and the
      stages are not Newton-solved: the transient is not accurate in time (odeint with
      the same solver object is). Measured on the hard case
      (benchmarks/steady_implicit_bench.py): Kvaerno3 52 evaluations, JVPs included (1.9x
      Anderson's; 324 with Newton–Krylov per stage), Kvaerno5 51, ImplicitEuler 45, so
      ImplicitEuler stays the default. `rtol`/`atol` do not apply there (refused), and
      `newton.linear_solver.max_iters` caps m; a step that evaluates a non-finite residual
      is rejected like one whose residual grew.

    Arguments:
        solver: `ImplicitEuler(...)`, an implicit `Kvaerno3(...)`/`Kvaerno5(...)` or an
            explicit RK solver object.
        dt0: first step (> 0) for the RK methods, explicit and implicit (ImplicitEuler has
            its own dt0).
        rtol, atol: local error tolerances of the adaptive explicit methods (> 0; refused
            when changed with an implicit solver, whose steps follow the residual).

    Raises:
        TypeError: solver not one of the above.
        ValueError: non-positive dt0 / tolerances; non-default dt0, rtol or atol given
            with ImplicitEuler (they would be ignored; set ImplicitEuler's fields instead), or
            rtol/atol with Kvaerno3/Kvaerno5.

    nfe counts every evaluation of f (RK stages; ImplicitEuler's and the ESDIRK steps' JVPs
    included). Reference: Kelley & Keyes (1998); Schmitt & Weiner (1995) for Krylov-W
    methods; Hairer, Nørsett & Wanner, "Solving Ordinary Differential Equations I", §II.4
    (step-size control).
    """

    solver: ImplicitEuler | RungeKutta = field(default_factory=ImplicitEuler)
    dt0: float = 1.0
    rtol: float = 1e-3
    atol: float = 1e-6

    stat_keys = ("t",)

    def __post_init__(self) -> None:
        if not isinstance(self.solver, (ImplicitEuler, RungeKutta, ImplicitRK)):
            raise TypeError(
                f"SteadyState's solver must be {_CHOICES}; got {type(self.solver).__name__}."
            )
        check_positive("dt0", self.dt0)
        check_positive("rtol", self.rtol)
        check_positive("atol", self.atol)
        if isinstance(self.solver, ImplicitEuler) and (
            self.dt0 != 1.0 or self.rtol != 1e-3 or self.atol != 1e-6
        ):
            raise ValueError(
                "dt0, rtol and atol of SteadyState apply to explicit RK solvers only; with "
                "ImplicitEuler set its own fields, e.g. SteadyState(ImplicitEuler(dt0=0.5))."
            )
        if isinstance(self.solver, ImplicitRK) and (self.rtol != 1e-3 or self.atol != 1e-6):
            raise ValueError(
                "rtol and atol of SteadyState are local-error tolerances of explicit RK "
                "solvers; an implicit solver's steps follow the residual instead (the "
                "fixed-point tolerances decide when it has converged): drop them, e.g. "
                "SteadyState(Kvaerno3(), dt0=0.5), and set fixed_point's atol/rtol."
            )

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        if isinstance(self.solver, ImplicitEuler):
            return self.solver.init(fn, z, fz)
        residual = rms_norm(fz - z).detach()
        state = {
            "z": z,
            "fz": fz,
            "t": torch.zeros_like(residual),
            "dt": torch.full_like(residual, self.dt0),
            "previous": residual,
            "nonfinite_trial": torch.zeros_like(residual, dtype=torch.bool),
        }
        if isinstance(self.solver, ImplicitRK):
            state["eta"] = torch.full_like(residual, _ETA_MAX)
        else:  # the explicit methods' cap on dt after a rejection
            state["cap"] = torch.full_like(residual, float("inf"))
        return state

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int | torch.Tensor]:
        if isinstance(self.solver, ImplicitEuler):
            return self.solver.step(fn, state, step_index)
        if isinstance(self.solver, ImplicitRK):
            return self._esdirk_step(fn, state, step_index)
        return self._rk_step(fn, state)

    def _esdirk_step(self, fn: Fn, state: State, step_index: int
                     ) -> tuple[State, torch.Tensor]:
        z, fz, dt = state["z"], state["fz"], state["dt"]
        g = fz - z
        residual = rms_norm(g).detach()
        eta = state["eta"]
        if step_index > 0:
            eta = forcing_term(eta, residual, state["previous"], state["tolerance"],
                               _ETA_MIN, _ETA_MAX)
        z_new, nfe = krylov_esdirk_step(
            fn, z, g, dt, self.solver.tableau, eta, self.solver.newton.linear_solver.max_iters)
        # f at the new state, evaluated: the loop's convergence test must see the true f(z)
        fz_new = fn(z_new)
        nfe = nfe + 1
        residual_new = rms_norm(fz_new - z_new).detach()
        # Accuracy of the transient is not the goal, the steady state is: a step is kept when
        # the residual did not grow more than 2-fold, and dt follows the residual's fall
        # (switched evolution relaxation, as ImplicitEuler), which an L-stable method can
        # afford at any size.
        new_state = residual_driven_step(state, z_new, fz_new, residual, residual_new, eta,
                                         2.0, _DT_MAX)
        return new_state, nfe

    def _rk_step(self, fn: Fn, state: State) -> tuple[State, int | torch.Tensor]:
        z, fz, t, dt = state["z"], state["fz"], state["t"], state["dt"]
        tableau = self.solver.tableau

        def vector_field(time: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fn(y) - y

        g = fz - z
        z_new, error, k_last, nfe = rk_step(vector_field, t, z, dt, tableau, k1=g)
        if k_last is None:
            fz_new = fn(z_new)
            nfe += 1
        else:
            fz_new = k_last + z_new
        if not tableau.adaptive:
            return {**state, "z": z_new, "fz": fz_new, "t": t + dt,
                    "nonfinite_trial": torch.zeros_like(t, dtype=torch.bool)}, nfe
        residual = rms_norm(g).detach()
        residual_new = rms_norm(fz_new - z_new).detach()
        scale = self.atol + self.rtol * torch.maximum(z.abs(), z_new.abs())
        ratio = rms_norm((error / scale).detach())
        accept = (
            torch.isfinite(ratio) & (ratio <= 1) & torch.isfinite(residual_new)
            & (residual_new <= 2 * residual)
        )
        exponent = -1.0 / (min(tableau.order, tableau.error_order) + 1)
        safe_ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, 1e10))
        factor = (0.9 * safe_ratio.clamp_min(1e-10).pow(exponent)).clamp(0.2, 10.0)
        factor = torch.where(accept, factor, torch.minimum(factor, torch.full_like(factor, 0.5)))
        # Stability memory: near the steady state the error estimate is tiny, so the accuracy
        # factor alone would jump far past the stability limit and be rejected again and
        # again. A rejected dt caps the next ones (just below it); the cap relaxes by 1.05 per
        # accepted step so the limit is probed again, slowly.
        cap = torch.where(accept, state["cap"] * 1.05, torch.minimum(state["cap"], 0.9 * dt))
        keep = expand_as_batch(accept, z)
        new_state = {
            "z": torch.where(keep, z_new, z),
            "fz": torch.where(keep, fz_new, fz),
            "t": torch.where(accept, t + dt, t),
            "dt": torch.minimum(dt * factor.to(dt.dtype), cap),
            "cap": cap,
            "nonfinite_trial": ~torch.isfinite(residual_new),
        }
        return new_state, nfe
