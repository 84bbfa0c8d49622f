"""The costate p(t) = ∂L/∂x(t) of a neural ODE, and the Hamiltonian H = p·F.

For dx/dt = F(t, x; θ) on [t0, T] and a loss L(x(T)), the adjoint (costate)

    p(t) = ∂L/∂x(t),   dp/dt = −p·∂F/∂x,   p(T) = ∂L/∂x(T),

is the momentum conjugate to x for H(x, p, t) = p·F(t, x): Hamilton's equations
dx/dt = ∂H/∂p, dp/dt = −∂H/∂x are the forward and adjoint equations, and

    dL/dθ = ∫ p·∂F/∂θ dt,    dH/dt = ∂H/∂t = p·∂F/∂t   (so H is constant for autonomous F)

(Pontryagin; Chen et al., "Neural ODEs", NeurIPS 2018; Ruseckas, arXiv 1909.03767, Sec. 3).

`costate` solves x forwards and the augmented system [x, p, W, G] backwards from T, where
W(t) = ∫_t^T p·∂F/∂s ds (the "work" of the explicit time dependence, so H(T) − H(t) = W(t))
and G(t) = ∫_t^T p·∂F/∂θ ds (so G(t0) = dL/dθ). Both are read off at a common time grid.

As in the continuous adjoint of Chen et al., x is re-integrated backwards alongside p rather
than stored; where the forward flow contracts strongly the backward one expands and amplifies
the solver error (Gholami et al., "ANODE", 2019). By default the backward solve is therefore
restarted at each grid point from the forward x there (memory O(n_points), not O(steps)).

Each sample is integrated with its own steps, forwards and backwards (unlike
`equilibria.ode.adjoint_trajectory`, which solves the batch as one system): a sample's p does
not depend on its batch-mates. Parameter gradients are kept per sample (torch.func.vmap).

Convention (the odeint one): F is called f(t, x) with t of shape (batch, 1, ..., 1) (each
sample its own time, broadcasting against x) and x of shape (batch, ...). Every sample is its
own problem; samples never mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_finite, check_positive_int, check_tolerances
from .._solution import EquilibriaError, Solution
from ..ode import Tsit5, odeint
from ..ode._rk import time_like

__all__ = ["Costate", "costate", "hamiltonian"]

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Costate:
    """Forward state and adjoint on a common time grid (n = n_points).

    Attributes:
        t: (n,) the grid, t0 .. T increasing (or decreasing if T < t0).
        x: (n, batch, ...) the forward solution x(t).
        p: (n, batch, ...) the adjoint p(t) = ∂L/∂x(t); p[-1] = ∂L/∂x(T), p[0] = dL/dx0.
        work: (n, batch) W(t) = ∫_t^T p·∂F/∂s ds, so that H(T) − H(t) = W(t) (zero for an
            autonomous F).
        param_grads: {name: (batch, *shape)} per-sample dL/dθ = ∫ p·∂F/∂θ dt when asked
            for (param_grads=True), else None. Sum over dim 0 for the batch gradient.
        forward: the forward Solution (its status and stats).
        backward: the backward Solution of the augmented system.
    """

    t: torch.Tensor
    x: torch.Tensor
    p: torch.Tensor
    work: torch.Tensor
    param_grads: dict[str, torch.Tensor] | None
    forward: Solution
    backward: Solution

    @property
    def success(self) -> torch.Tensor:
        """(batch,) bool: both solves succeeded for the sample."""
        return self.forward.success & self.backward.success


def hamiltonian(f: VectorField, x: torch.Tensor, p: torch.Tensor, t: Any) -> torch.Tensor:
    """H(x, p, t) = Σ p·F(t, x) over each sample's elements.

    Arguments:
        f: the vector field f(t, x), t of shape (batch, 1, ..., 1).
        x, p: (batch, ...) state and costate, same shape.
        t: a number, a 0-dim tensor, a (batch,) or a (batch, 1, ..., 1) tensor.

    Returns:
        (batch,) tensor.

    Raises:
        ValueError: x and p of different shapes, or t of the wrong shape.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(p, torch.Tensor):
        raise TypeError("x and p must be tensors of shape (batch, ...).")
    if x.shape != p.shape or x.dim() < 1:
        raise ValueError(
            f"x and p must have the same shape (batch, ...), got {tuple(x.shape)}, "
            f"{tuple(p.shape)}."
        )
    t = _batch_time(t, x)
    return (p * f(t, x)).reshape(x.shape[0], -1).sum(dim=1)


def costate(
    f: VectorField,
    x0: torch.Tensor,
    t_span: tuple[float, float],
    *,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_xT: torch.Tensor | None = None,
    param_grads: bool = False,
    solver: Any = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    n_points: int = 65,
    max_steps: int = 10_000,
    dt0: float | None = None,
    restart_from_forward: bool = True,
    throw: bool = False,
) -> Costate:
    """x(t) forwards and the adjoint p(t) = ∂L/∂x(t) backwards, on a common grid.

    Arguments:
        f: vector field f(t, x) -> dx/dt, t (batch, 1, ...), x (batch, ...). With
            param_grads=True it must be a torch.nn.Module (its parameters are the θ of dL/dθ)
            that handles a batch of one (it is vmapped over samples by torch.func).
        x0: (batch, ...) initial state.
        t_span: (t0, T).
        loss_fn: L(x(T)) -> scalar or (batch,) per-sample losses; p(T) = ∂L/∂x(T). Give
            exactly one of loss_fn and grad_xT.
        grad_xT: (batch, ...) the terminal condition p(T) = ∂L/∂x(T) directly.
        param_grads: also integrate G = ∫ p·∂F/∂θ dt per sample.
        solver: an equilibria ODE solver object (default Tsit5()); fixed-step ones need dt0.
        rtol, atol: tolerances of both the forward and the backward solve.
        n_points: size of the common grid (>= 2), equally spaced from t0 to T.
        max_steps: step bound of each solve.
        dt0: initial (adaptive) or fixed step size, passed to odeint.
        restart_from_forward: integrate backwards one grid interval at a time, restarting x
            from the forward solution at each grid point, so that the error of the backward
            reconstruction of x cannot grow over more than one interval (it does grow where
            the forward flow contracts). False: one backward solve over [t0, T].
        throw: raise EquilibriaError when a sample's forward or backward solve failed.

    Returns:
        Costate (t, x, p, work, param_grads, forward, backward).

    Raises:
        TypeError / ValueError: bad arguments (naming them); EquilibriaError with throw=True.
    """
    _check_flow(f, x0)
    if (loss_fn is None) == (grad_xT is None):
        raise ValueError("pass exactly one of loss_fn (L(x(T))) and grad_xT (∂L/∂x(T)).")
    if grad_xT is not None and (
        not isinstance(grad_xT, torch.Tensor) or grad_xT.shape != x0.shape
    ):
        raise ValueError(
            f"grad_xT must be a tensor of the shape of x0 {tuple(x0.shape)}, got "
            f"{getattr(grad_xT, 'shape', type(grad_xT).__name__)}."
        )
    if param_grads and not isinstance(f, torch.nn.Module):
        raise TypeError(
            "param_grads=True needs f to be a torch.nn.Module (its parameters are θ); wrap a "
            "function in a Module or leave param_grads=False."
        )
    n_points, (t0, t1), options = _solve_options(
        n_points, t_span, solver, rtol, atol, max_steps, dt0
    )

    grid = torch.linspace(t0, t1, n_points, dtype=torch.float64)
    x0 = x0.detach()
    with torch.no_grad():
        forward = odeint(f, x0, (t0, t1), t_eval=grid.tolist(), **options)
    x_path = forward.value
    x_T = x_path[-1]

    if grad_xT is None:
        with torch.enable_grad():
            x_leaf = x_T.detach().requires_grad_(True)
            loss = loss_fn(x_leaf)
            if not isinstance(loss, torch.Tensor) or loss.dim() > 1:
                raise ValueError("loss_fn must return a scalar or a (batch,) tensor of losses.")
            # Samples are independent, so the gradient of the sum is each sample's own.
            (p_T,) = torch.autograd.grad(loss.sum(), x_leaf)
    else:
        p_T = grad_xT.detach().to(x0.dtype)

    batch, shape = x0.shape[0], x0.shape
    size = x0[0].numel()
    named = dict(f.named_parameters()) if param_grads else {}
    n_param = sum(v.numel() for v in named.values())
    augmented = _AugmentedField(f, shape, size, named)
    zeros = x0.new_zeros(batch, 1 + n_param)
    state_T = torch.cat([x_T.reshape(batch, -1), p_T.reshape(batch, -1), zeros], dim=1)
    with torch.no_grad():
        if restart_from_forward:
            backward = _backward_in_segments(augmented, state_T, x_path, grid, size, options)
        else:
            backward = odeint(
                augmented, state_T, (t1, t0), t_eval=grid.flip(0).tolist(), **options
            )
    path = backward.value.flip(0)  # back onto the increasing grid
    p_path = path[:, :, size : 2 * size].reshape(n_points, *shape)
    work = path[:, :, 2 * size]
    grads = None
    if param_grads:
        grads, offset = {}, 2 * size + 1
        for name, value in named.items():
            grads[name] = path[0, :, offset : offset + value.numel()].reshape(batch, *value.shape)
            offset += value.numel()
    result = Costate(
        t=grid.to(x0.dtype),
        x=x_path,
        p=p_path,
        work=work,
        param_grads=grads,
        forward=forward,
        backward=backward,
    )
    if throw and not bool(result.success.all()):
        message = forward.failure_message() or backward.failure_message()
        raise EquilibriaError(f"costate failed for some samples:\n{message}")
    return result


class _AugmentedField:
    """d/dt [x, p, W, G] = [F, −p·∂F/∂x, −p·∂F/∂t, −p·∂F/∂θ] on flattened (batch, ·) states."""

    def __init__(
        self,
        f: VectorField,
        shape: torch.Size,
        size: int,
        named: dict[str, torch.Tensor],
    ) -> None:
        self.f, self.shape, self.size, self.named = f, shape, size, named

    def __call__(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        batch, size = state.shape[0], self.size
        x = state[:, :size].reshape(batch, *self.shape[1:])
        p = state[:, size : 2 * size].reshape(batch, *self.shape[1:])
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            # odeint shapes t against the flat state; f expects it shaped against x
            t = time_like(t.detach(), x).requires_grad_(True)
            dx = self.f(t, x)
            # Σ_i p_i·F(t_i, x_i): its gradient in x_i (t_i) is sample i's p·∂F/∂x (p·∂F/∂t),
            # because sample i's output depends on its own x_i and t_i only.
            vjp_x, vjp_t = torch.autograd.grad(dx, (x, t), grad_outputs=p, allow_unused=True)
        vjp_x = torch.zeros_like(x) if vjp_x is None else vjp_x
        vjp_t = torch.zeros_like(t) if vjp_t is None else vjp_t
        parts = [dx.detach().reshape(batch, -1), -vjp_x.reshape(batch, -1),
                 -vjp_t.reshape(batch, 1)]
        if self.named:
            parts.append(-self._per_sample_param_vjp(t.detach(), x.detach(), p))
        return torch.cat(parts, dim=1)

    def _per_sample_param_vjp(
        self, t: torch.Tensor, x: torch.Tensor, p: torch.Tensor
    ) -> torch.Tensor:
        """(batch, n_param): p_i·∂F(t_i, x_i)/∂θ for each sample, by vmap over samples."""
        module = self.f
        params = {name: value.detach() for name, value in self.named.items()}

        def one(t_i: torch.Tensor, x_i: torch.Tensor, p_i: torch.Tensor) -> torch.Tensor:
            def field(prm: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.functional_call(module, prm, (t_i[None], x_i[None]))[0]

            _, pullback = torch.func.vjp(field, params)
            (grads,) = pullback(p_i)
            return torch.cat([grads[name].reshape(-1) for name in params])

        return torch.func.vmap(one)(t, x, p)


def _check_flow(f: Any, x0: Any) -> None:
    """The field and initial state of a costate-like diagnostic (TypeError/ValueError)."""
    if not callable(f):
        raise TypeError(f"f must be callable as f(t, x), got {f!r}.")
    if not isinstance(x0, torch.Tensor) or x0.dim() < 1 or not x0.is_floating_point():
        raise TypeError("x0 must be a floating tensor of shape (batch, ...).")
    check_finite("x0", x0)


def _solve_options(
    n_points: Any, t_span: Any, solver: Any, rtol: float, atol: float, max_steps: int,
    dt0: float | None,
) -> tuple[int, tuple[float, float], dict[str, Any]]:
    """Checked grid size, (t0, T) and the odeint keyword arguments (default solver Tsit5)."""
    check_tolerances(atol, rtol)
    n_points = check_positive_int("n_points", n_points, minimum=2)
    if not isinstance(t_span, (tuple, list)) or len(t_span) != 2:
        raise TypeError(f"t_span must be a pair (t0, T), got {t_span!r}.")
    t0, t1 = (float(v) for v in t_span)
    if t0 == t1:
        raise ValueError(f"t_span must have t0 != T, got {t_span!r}.")
    options: dict[str, Any] = dict(
        solver=Tsit5() if solver is None else solver, rtol=rtol, atol=atol, max_steps=max_steps
    )
    if dt0 is not None:
        options["dt0"] = dt0
    return n_points, (t0, t1), options


def _backward_in_segments(
    augmented: _AugmentedField,
    state_T: torch.Tensor,
    x_path: torch.Tensor,
    grid: torch.Tensor,
    size: int,
    options: dict[str, Any],
) -> Solution:
    """The backward solve interval by interval, x reset to the forward x at each grid point.

    Returns a Solution shaped like odeint's with t_eval = the reversed grid: value
    (n, batch, ·) from T down to t0; status the first failure of each sample; stats summed.
    """
    n_points, batch = grid.shape[0], state_T.shape[0]
    times = grid.tolist()
    states = [state_T]
    status = torch.zeros(batch, dtype=torch.int64, device=state_T.device)
    totals: dict[str, torch.Tensor] = {}
    state = state_T
    for k in range(n_points - 1, 0, -1):
        state = state.clone()
        state[:, :size] = x_path[k].reshape(batch, -1)
        segment = odeint(augmented, state, (times[k], times[k - 1]), **options)
        state = segment.value
        states.append(state)
        status = torch.where(status == 0, segment.status, status)
        for key in ("nfe", "n_steps", "n_rejected"):
            totals[key] = totals.get(key, 0) + segment.stats[key]
        totals["t"] = segment.stats["t"]
    return Solution(torch.stack(states), status, totals)


def _batch_time(t: Any, x: torch.Tensor) -> torch.Tensor:
    """A number / 0-dim / (batch,) / (batch, 1, ..., 1) time as the (batch, 1, ..., 1) tensor
    in x's dtype and device that vector fields receive (the odeint convention)."""
    batch = x.shape[0]
    if isinstance(t, torch.Tensor):
        if t.dim() == 0:
            return time_like(t.to(x).expand(batch), x)
        if t.shape[0] == batch and t.numel() == batch:
            return time_like(t, x)
        raise ValueError(
            f"t must be a number, 0-dim or of shape ({batch},) / ({batch}, 1, ..., 1), got "
            f"{tuple(t.shape)}."
        )
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}.")
    return x.new_full((batch,) + (1,) * (x.dim() - 1), float(t))
