"""Conserved quantities of the adjoint, used as checks of gradient code.

With H(x, p, t) = p·F(t, x) and p(t) = ∂L/∂x(t) (see `_costate`), Hamilton's equations give:

- H is constant along (x, p) when F does not depend on t;
- for a time-dependent F, H(T) − H(t) = ∫_t^T p·∂F/∂s ds (the balance), so H + W is constant
  with W(t) = ∫_t^T p·∂F/∂s ds;
- p·v is constant for every tangent v, dv/dt = ∂F/∂x·v: d(p·v)/dt = −p J v + p J v = 0.
  Its discrete twin is exact: autograd through any step map Φ gives p_k = J_kᵀ p_{k+1}, and
  v_{k+1} = J_k v_k, so p_k·v_k = p_{k+1}·v_{k+1} up to rounding (Griewank & Walther,
  "Evaluating Derivatives", 2008, ch. 3);
- Noether: if F(λx) = λF(x) (a bias-free ReLU MLP is degree-1 homogeneous), then
  ∂F/∂x·x = F (Euler), so d(x·p)/dt = p·F − p·∂F/∂x·x = 0: x·∂L/∂x is constant. The symmetry
  is the scaling x -> λx (Ruseckas, arXiv 1909.03767, Sec. 4).

Each diagnostic returns a `Conservation`: the quantity along the grid, per sample, and its
drift. A drift far above the solver tolerance (or, for the discrete pairing, above rounding)
means the gradient code — or the premise (autonomy, homogeneity) — is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_finite, check_positive_int, check_tolerances
from ..ode import Tsit5, odeint
from ..ode._rk import time_like
from ._costate import Costate, VectorField

__all__ = [
    "Balance",
    "Conservation",
    "discrete_pairing",
    "hamiltonian_balance",
    "hamiltonian_drift",
    "noether_charge",
    "tangent_pairing",
]


@dataclass(frozen=True)
class Conservation:
    """A per-sample quantity Q along a grid, and how far it moved.

    Attributes:
        t: (n,) the grid (times, or step indices for a discrete map).
        values: (n, batch) Q at each grid point.
        drift: (batch,) max over the grid of |Q(t) − Q(t_0)|.
        relative_drift: (batch,) drift / scale, the scale being max over the grid of the product
            of the norms of Q's two factors (‖p‖‖F‖ for H, ‖p‖‖v‖, ‖x‖‖p‖); drift where 0.
    """

    t: torch.Tensor
    values: torch.Tensor
    drift: torch.Tensor
    relative_drift: torch.Tensor

    @classmethod
    def of(cls, t: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> Conservation:
        """From Q along the grid (n, batch) and the per-sample scale of its terms (batch,)."""
        drift = (values - values[:1]).abs().amax(dim=0)
        positive = scale > 0
        relative = torch.where(positive, drift / torch.where(positive, scale, 1), drift)
        return cls(t=t, values=values, drift=drift, relative_drift=relative)


def _pair_scale(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max over the grid of ‖a‖·‖b‖ per sample, for a, b of shape (n, batch, ...).

    The natural scale of the pairing Σ a·b: an error δa, δb moves it by at most
    ‖δa‖‖b‖ + ‖a‖‖δb‖, however much the terms cancel, so drift / scale is comparable with the
    solver's relative tolerance even when the pairing itself is near zero.
    """
    n, batch = a.shape[:2]
    norms = a.reshape(n, batch, -1).norm(dim=2) * b.reshape(n, batch, -1).norm(dim=2)
    return norms.amax(dim=0)


@dataclass(frozen=True)
class Balance:
    """H for a time-dependent F, and the balance H(t) + W(t) = H(T).

    Attributes:
        hamiltonian: Conservation of H itself (its drift is the energy put in by ∂F/∂t).
        work: (n, batch) W(t) = ∫_t^T p·∂F/∂s ds.
        balanced: Conservation of H + W, constant when the adjoint is right.
    """

    hamiltonian: Conservation
    work: torch.Tensor
    balanced: Conservation


def _hamiltonian_path(f: VectorField, cs: Costate) -> tuple[torch.Tensor, torch.Tensor]:
    """H along the grid (n, batch) and its scale max ‖p‖‖F‖ (batch,)."""
    with torch.no_grad():
        n, batch = cs.x.shape[:2]
        fields = torch.stack(
            [f(time_like(cs.t[k].to(cs.x).expand(batch), cs.x[k]), cs.x[k]) for k in range(n)]
        )
        values = (cs.p * fields).reshape(n, batch, -1).sum(dim=2)
        return values, _pair_scale(cs.p, fields)


def _check_costate(cs: Any) -> None:
    if not isinstance(cs, Costate):
        raise TypeError(f"cs must be the Costate returned by costate(), got {type(cs).__name__}.")


def hamiltonian_drift(f: VectorField, cs: Costate) -> Conservation:
    """H(t) = p(t)·F(t, x(t)) along a costate; constant for an autonomous F.

    Arguments:
        f: the vector field the costate was computed for.
        cs: the Costate.

    Returns:
        Conservation of H; for an autonomous F its relative drift is of the order of the
        solver tolerance.
    """
    _check_costate(cs)
    return Conservation.of(cs.t, *_hamiltonian_path(f, cs))


def hamiltonian_balance(f: VectorField, cs: Costate) -> Balance:
    """The balance H(T) − H(t) = ∫_t^T p·∂F/∂s ds for a time-dependent F.

    ∂F/∂t comes from autograd inside the backward solve (the Costate's `work`), integrated to
    the solver's tolerance alongside p.

    Returns:
        Balance: H alone (drifts) and H + W (constant to tolerance).
    """
    _check_costate(cs)
    path, scale = _hamiltonian_path(f, cs)
    return Balance(
        hamiltonian=Conservation.of(cs.t, path, scale),
        work=cs.work,
        balanced=Conservation.of(cs.t, path + cs.work, scale),
    )


def noether_charge(cs: Costate) -> Conservation:
    """The Noether quantity x·p = x·∂L/∂x along a costate.

    Constant when F is degree-1 homogeneous in x (F(λx) = λF(x), e.g. a ReLU MLP without
    biases, autonomous); not for a general field (tanh, or any bias).
    """
    _check_costate(cs)
    values = (cs.x * cs.p).reshape(cs.x.shape[0], cs.x.shape[1], -1).sum(dim=2)
    return Conservation.of(cs.t, values, _pair_scale(cs.x, cs.p))


def tangent_pairing(
    f: VectorField,
    cs: Costate,
    v0: torch.Tensor,
    *,
    solver: Any = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps: int = 10_000,
    dt0: float | None = None,
) -> Conservation:
    """p(t)·v(t) for the tangent dv/dt = ∂F/∂x·v, v(t0) = v0; constant along a correct adjoint.

    v is integrated together with x (forward-mode JVPs, torch.func.jvp) and read at the
    costate's grid; at t0 it gives p(t0)·v0 = the directional derivative of L along v0.

    Arguments:
        f: the vector field of the costate.
        cs: the Costate.
        v0: (batch, ...) initial tangent, the shape of x.
        solver, rtol, atol, max_steps, dt0: of the forward [x, v] solve.

    Returns:
        Conservation of Σ p·v.
    """
    _check_costate(cs)
    shape = cs.x.shape[1:]
    if not isinstance(v0, torch.Tensor) or v0.shape != shape:
        raise ValueError(
            f"v0 must be a tensor of the shape of x {tuple(shape)}, got "
            f"{getattr(v0, 'shape', type(v0).__name__)}."
        )
    check_finite("v0", v0)
    check_tolerances(atol, rtol)
    batch, size = shape[0], cs.x[0, 0].numel()

    def field(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # odeint drops finished samples, so the batch here may be smaller than x's.
        rows = state.shape[0]
        x = state[:, :size].reshape(rows, *shape[1:])
        v = state[:, size:].reshape(rows, *shape[1:])
        t = time_like(t, x)  # odeint shapes t against the flat state, f expects x's shape
        dx, dv = torch.func.jvp(lambda y: f(t, y), (x,), (v,))
        return torch.cat([dx.reshape(rows, -1), dv.reshape(rows, -1)], dim=1)

    options = dict(solver=Tsit5() if solver is None else solver, rtol=rtol, atol=atol)
    options["max_steps"] = max_steps
    if dt0 is not None:
        options["dt0"] = dt0
    state0 = torch.cat([cs.x[0].reshape(batch, -1), v0.reshape(batch, -1).to(cs.x)], dim=1)
    t = cs.t.tolist()
    with torch.no_grad():
        path = odeint(field, state0, (t[0], t[-1]), t_eval=t, **options).value
    v_path = path[:, :, size:]
    p_path = cs.p.reshape(len(t), batch, -1)
    values = (p_path * v_path).sum(dim=2)
    return Conservation.of(cs.t, values, _pair_scale(p_path, v_path))


def discrete_pairing(
    step: Callable[[int, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    v0: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n_steps: int,
) -> Conservation:
    """p_k·v_k for a discrete map x_{k+1} = step(k, x_k), exact up to rounding.

    p_k = ∂L/∂x_k by reverse-mode autograd through the whole chain (the discrete adjoint);
    v_{k+1} = (∂step/∂x)(x_k)·v_k by forward-mode AD (torch.func.jvp), which uses the ops'
    forward derivative formulas, independent of their backward ones: a VJP that is not the
    transpose of the JVP (a wrong custom backward) makes the pairing drift. Any step map
    qualifies: a fixed-step ODE solver step (e.g.
    `odeint(f, x, (k h, (k+1) h), solver=RK4(), dt0=h).value`), a network layer. A custom
    torch.autograd.Function inside it needs a `jvp` (and the setup_context form).

    Arguments:
        step: step(k, x) -> x_next, differentiable, (batch, ...) -> (batch, ...).
        x0, v0: (batch, ...) initial state and tangent.
        loss_fn: L(x_N) -> scalar or (batch,).
        n_steps: N >= 1.

    Returns:
        Conservation over t = 0..N (step indices) of Σ p_k·v_k per sample.
    """
    if not callable(step):
        raise TypeError(f"step must be callable as step(k, x), got {step!r}.")
    if not isinstance(x0, torch.Tensor) or not isinstance(v0, torch.Tensor) or x0.shape != v0.shape:
        raise ValueError("x0 and v0 must be tensors of the same shape (batch, ...).")
    n_steps = check_positive_int("n_steps", n_steps)
    with torch.enable_grad():
        states = [x0.detach().requires_grad_(True)]
        for k in range(n_steps):
            states.append(step(k, states[-1]))
        loss = loss_fn(states[-1])
        if not isinstance(loss, torch.Tensor) or loss.dim() > 1:
            raise ValueError("loss_fn must return a scalar or a (batch,) tensor of losses.")
        costates = torch.autograd.grad(loss.sum(), states)
    tangents = [v0.detach().to(x0)]
    for k in range(n_steps):
        # Re-evaluating step(k, ·) at the same x_k is deterministic, so J_k is the same
        # linearisation the reverse pass used.
        _, jvp = torch.func.jvp(lambda x, k=k: step(k, x), (states[k].detach(),), (tangents[-1],))
        tangents.append(jvp.detach())
    batch = x0.shape[0]
    p_path = torch.stack([p.detach() for p in costates]).reshape(n_steps + 1, batch, -1)
    v_path = torch.stack(tangents).reshape(n_steps + 1, batch, -1)
    values = (p_path * v_path).sum(dim=2)
    t = torch.arange(n_steps + 1, dtype=x0.dtype, device=x0.device)
    return Conservation.of(t, values, _pair_scale(p_path, v_path))
