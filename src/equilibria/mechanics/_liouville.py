"""Liouville: how a neural ODE's flow changes phase volume, three independent ways.

For dx/dt = F(t, x) the flow map Φ = ∂x(T)/∂x(t0) changes volume by

    log |det Φ| = ∫_{t0}^{T} tr(∂F/∂x)(t, x(t)) dt          (Liouville / Abel–Jacobi)

and the adjoint is its transpose: with p(T) = e_i, the costate gives p(t0) = e_i·Φ, the i-th
row of Φ. So the adjoint flow p(T) -> p(t0) scales volume by det Φ and the phase flow of
(x, p) preserves it, as every Hamiltonian flow does (H = p·F). `liouville` computes

- `log_volume`: the trace integral, carried along x as one more state;
- `log_det_flow`: log |det Φ| from the variational equation dV/dt = (∂F/∂x) V, V(t0) = I;
- `log_det_adjoint`: log |det Φ| from the d rows that `costate` returns for p(T) = e_1..e_d,

so agreement of the first (forward, a scalar ODE) with the last (the adjoint code) is an
exact check of gradient code, with no finite differences. The Jacobian is formed with d
forward-mode JVPs per evaluation, so the state is limited to small dimensions.

Reference: Ruseckas, arXiv 1909.03767, Sec. 3 (phase-space volume is conserved);
Arnold, "Mathematical Methods of Classical Mechanics", §16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._solution import Solution
from ..ode import odeint
from ..ode._rk import time_like
from ._costate import VectorField, _check_flow, _solve_options, costate

__all__ = ["PhaseVolume", "liouville"]

MAX_DIM = 64


@dataclass(frozen=True)
class PhaseVolume:
    """The volume change of a flow on [t0, T], three ways (see the module docstring).

    Attributes:
        t: (n,) grid from t0 to T.
        log_volume: (n, batch) ∫_{t0}^{t} tr(∂F/∂x) ds at each grid time.
        log_det_flow: (batch,) log |det ∂x(T)/∂x(t0)| from the variational equation.
        log_det_adjoint: (batch,) the same from the costate's rows, or None (adjoint=False).
        forward: the Solution of the forward (x, V, log volume) system.
    """

    t: torch.Tensor
    log_volume: torch.Tensor
    log_det_flow: torch.Tensor
    log_det_adjoint: torch.Tensor | None
    forward: Solution

    @property
    def gap(self) -> torch.Tensor:
        """(batch,) largest disagreement among the (two or three) log-volumes at T."""
        values = [self.log_volume[-1], self.log_det_flow]
        if self.log_det_adjoint is not None:
            values.append(self.log_det_adjoint)
        stacked = torch.stack(values)
        return stacked.amax(dim=0) - stacked.amin(dim=0)


class _VariationalField:
    """[x, V, ℓ] -> [F, (∂F/∂x) V, tr ∂F/∂x] with the Jacobian from d JVPs (x flattened)."""

    def __init__(self, f: VectorField, sample_shape: torch.Size) -> None:
        self.f, self.sample_shape = f, sample_shape
        self.size = sample_shape.numel()

    def __call__(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        batch, d = state.shape[0], self.size  # odeint may pass only the unfinished rows
        shape = (batch, *self.sample_shape)
        x = state[:, :d].reshape(shape)
        v = state[:, d : d + d * d].reshape(batch, d, d)
        columns, fx = [], None
        t = time_like(t, x)  # odeint shapes t against the flat state, f expects x's shape
        for i in range(d):
            tangent = torch.zeros_like(x).reshape(batch, d)
            tangent[:, i] = 1.0
            fx, column = torch.func.jvp(lambda y: self.f(t, y), (x,), (tangent.reshape(shape),))
            columns.append(column.reshape(batch, d))
        jacobian = torch.stack(columns, dim=2)  # (batch, d, d): column i = J e_i
        trace = jacobian.diagonal(dim1=1, dim2=2).sum(dim=1, keepdim=True)
        dv = torch.bmm(jacobian, v).reshape(batch, d * d)
        return torch.cat([fx.reshape(batch, d), dv, trace], dim=1)


def liouville(
    f: VectorField,
    x0: torch.Tensor,
    t_span: tuple[float, float],
    *,
    adjoint: bool = True,
    solver: Any = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    n_points: int = 33,
    max_steps: int = 10_000,
    dt0: float | None = None,
) -> PhaseVolume:
    """Phase-volume change of dx/dt = f(t, x) over t_span, by Liouville's formula, by the
    variational equation and (adjoint=True) by the adjoint `costate`.

    Arguments:
        f: vector field f(t, x) -> dx/dt, t of shape (batch, 1, ..., 1), x (batch, ...); must be
            differentiable by torch.func.jvp.
        x0: (batch, ...) floating initial states, at most 64 elements per sample (the
            Jacobian costs one JVP per element at every evaluation).
        t_span: (t0, T), t0 != T.
        adjoint: also compute log |det Φ| from the costate (d backward solves per batch).
        n_points: the grid of `log_volume`, and where the costate's backward solve restarts x
            from the forward solution (as `costate` does; without restarts the backward
            reconstruction of x drifts where the flow contracts, and log_det_adjoint with it:
            7e-6 instead of 3e-7 on the rings demo's 2-D flow at rtol 1e-8).
        solver, rtol, atol, max_steps, dt0: as for `costate` (tighter default tolerances: the
            three values agree to about the solver error).

    Returns:
        PhaseVolume; `.gap` is the per-sample disagreement.

    Raises:
        TypeError / ValueError: bad arguments (naming them and the fix).
    """
    _check_flow(f, x0)
    size = x0[0].numel()
    if size > MAX_DIM:
        raise ValueError(
            f"x0 has {size} elements per sample; liouville forms the full Jacobian (one JVP "
            f"per element per evaluation) and allows at most {MAX_DIM}. Use a smaller "
            "system, or mechanics.hamiltonian_drift / tangent_pairing, which scale."
        )
    if not isinstance(adjoint, bool):
        raise TypeError(f"adjoint must be a bool, got {type(adjoint).__name__}.")
    n_points, (t0, t1), options = _solve_options(
        n_points, t_span, solver, rtol, atol, max_steps, dt0
    )

    batch = x0.shape[0]
    x0 = x0.detach()
    identity = torch.eye(size, dtype=x0.dtype, device=x0.device).expand(batch, size, size)
    state0 = torch.cat(
        [x0.reshape(batch, size), identity.reshape(batch, -1), x0.new_zeros(batch, 1)], dim=1
    )
    grid = torch.linspace(t0, t1, n_points, dtype=torch.float64)
    with torch.no_grad():
        forward = odeint(
            _VariationalField(f, x0.shape[1:]), state0, (t0, t1), t_eval=grid.tolist(), **options
        )
    path = forward.value  # (n, batch, size + size^2 + 1)
    flow = path[-1, :, size : size + size * size].reshape(batch, size, size)
    log_det_flow = torch.linalg.slogdet(flow).logabsdet
    log_det_adjoint = None
    if adjoint:
        rows = []
        for i in range(size):
            grad_xT = x0.new_zeros(batch, size)
            grad_xT[:, i] = 1.0
            cs = costate(
                f, x0, (t0, t1), grad_xT=grad_xT.reshape(x0.shape), n_points=n_points, **options
            )
            rows.append(cs.p[0].reshape(batch, size))
        log_det_adjoint = torch.linalg.slogdet(torch.stack(rows, dim=1)).logabsdet
    return PhaseVolume(
        t=grid.to(x0.dtype),
        log_volume=path[:, :, -1],
        log_det_flow=log_det_flow,
        log_det_adjoint=log_det_adjoint,
        forward=forward,
    )
