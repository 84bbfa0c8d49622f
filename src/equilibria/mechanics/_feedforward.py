"""Feedforward networks as ODEs: a layer stack <-> dx/dt = w(t) x + b(t) + g(x), both ways.

Ruseckas (arXiv 1909.03767, Sec. 2) models a network with near-identity weights and small
nonlinearities by the ODE

    dx/dt = w(t) x + b(t) + g(x),   t in [0, T],                              (1)

whose step of length Δt = T / L, taken as a linear Euler step followed by a nonlinear one,

    x_{l+1} = h(W_l x_l + B_l),   W_l = I + Δt w(t_l),  B_l = Δt b(t_l),  h(x) = x + Δt g(x),

is an ordinary layer (t_l = l Δt). The network of L such layers approximates the flow of (1)
to O(Δt) = O(1/L) (a Lie splitting of Euler steps). Read backwards, any layer stack defines
(1) with w, b piecewise constant on the L intervals and g(x) = (h(x) − x) / Δt; how far the
stack is from a *smooth* ODE is measured by `ode_likeness`: L·max_l ‖W_l − I‖ and
L·sup_z |h(z) − z| stay bounded as L grows only for an ODE-like network.

Shapes: x is (batch, d); weights (L, d, d); biases (L, d); w as a tensor (K, d, d) is piecewise
constant on K equal pieces of [0, T], as a callable maps t of shape (batch,) to (batch, d, d)
(or a shared (d, d)); likewise b to (batch, d) or (d,).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._checks import check_positive, check_positive_int

__all__ = [
    "LayerODE",
    "LayerStack",
    "ODELikeness",
    "layers_to_ode",
    "ode_likeness",
    "ode_to_layers",
]

Field = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerStack:
    """L layers x_{l+1} = h(W_l x_l + B_l) sharing one nonlinearity h.

    Attributes:
        weights: (L, d, d) tensor, W_l.
        biases: (L, d) tensor, B_l.
        h: the nonlinearity, a callable (batch, d) -> (batch, d) (usually elementwise).
    """

    weights: torch.Tensor
    biases: torch.Tensor
    h: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        weights, biases = self.weights, self.biases
        if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
            raise ValueError(
                f"weights must be a tensor of shape (L, d, d), got "
                f"{getattr(weights, 'shape', type(weights).__name__)}."
            )
        if weights.shape[1] != weights.shape[2] or weights.shape[0] < 1:
            raise ValueError(
                f"weights must be (L, d, d) with L >= 1 and square layers, got "
                f"{tuple(weights.shape)}; a layer of (1) maps R^d to R^d."
            )
        if not isinstance(biases, torch.Tensor) or biases.shape != weights.shape[:2]:
            raise ValueError(
                f"biases must have shape (L, d) = {tuple(weights.shape[:2])}, got "
                f"{getattr(biases, 'shape', type(biases).__name__)}."
            )
        if not callable(self.h):
            raise TypeError(f"h must be callable (the nonlinearity), got {self.h!r}.")

    @classmethod
    def from_linears(
        cls, linears: Sequence[torch.nn.Linear], h: Callable[[torch.Tensor], torch.Tensor]
    ) -> LayerStack:
        """Build from square nn.Linear layers (a missing bias counts as zero)."""
        if not linears or not all(isinstance(lin, torch.nn.Linear) for lin in linears):
            raise TypeError("linears must be a non-empty sequence of torch.nn.Linear.")
        weights = torch.stack([lin.weight.detach() for lin in linears])
        zeros = [lin.weight.new_zeros(lin.out_features) for lin in linears]
        biases = torch.stack(
            [lin.bias.detach() if lin.bias is not None else z for lin, z in zip(linears, zeros)]
        )
        return cls(weights, biases, h)

    @property
    def n_layers(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.weights.shape[1]

    def __call__(self, x: torch.Tensor, return_all: bool = False) -> torch.Tensor:
        """Apply the stack to x (batch, d); with return_all, all L + 1 states (L+1, batch, d)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"x must be a tensor of shape (batch, {self.dim}), got "
                f"{getattr(x, 'shape', type(x).__name__)}."
            )
        states = [x]
        for weight, bias in zip(self.weights, self.biases):
            x = self.h(x @ weight.T + bias)
            states.append(x)
        return torch.stack(states) if return_all else x


@dataclass(frozen=True)
class LayerODE:
    """The ODE (1): dx/dt = w(t) x + b(t) + g(x) on [0, T].

    Attributes:
        w: (K, d, d) tensor, piecewise constant on K equal pieces of [0, T]; or a callable
            t (batch,) -> (batch, d, d) or (d, d).
        b: (K, d) tensor, piecewise constant likewise; or a callable t (batch,) -> (batch, d)
            or (d,).
        g: the nonlinear part, a callable (batch, d) -> (batch, d).
        T: the final time (the network's "depth"), > 0.
    """

    w: Field
    b: Field
    g: Callable[[torch.Tensor], torch.Tensor]
    T: float = 1.0

    def __post_init__(self) -> None:
        check_positive("T", self.T)
        for name in ("w", "b"):
            value = getattr(self, name)
            if not (isinstance(value, torch.Tensor) or callable(value)):
                raise TypeError(f"{name} must be a tensor or a callable of t, got {value!r}.")
        if isinstance(self.w, torch.Tensor) and (
            self.w.dim() != 3 or self.w.shape[1] != self.w.shape[2]
        ):
            raise ValueError(f"w as a tensor must have shape (K, d, d), got {tuple(self.w.shape)}.")
        if isinstance(self.b, torch.Tensor) and self.b.dim() != 2:
            raise ValueError(f"b as a tensor must have shape (K, d), got {tuple(self.b.shape)}.")
        if isinstance(self.w, torch.Tensor) and isinstance(self.b, torch.Tensor):
            if self.b.shape != self.w.shape[:2]:
                raise ValueError(
                    f"piecewise-constant w {tuple(self.w.shape)} and b {tuple(self.b.shape)} "
                    "must have the same number of pieces K and dimension d."
                )
        if not callable(self.g):
            raise TypeError(f"g must be callable (the nonlinear part), got {self.g!r}.")

    def w_at(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) for t of shape (batch,): (batch, d, d) (or (d, d) from a shared callable)."""
        return self._at(self.w, t)

    def b_at(self, t: torch.Tensor) -> torch.Tensor:
        """b(t) for t of shape (batch,): (batch, d) (or (d,) from a shared callable)."""
        return self._at(self.b, t)

    def _at(self, field: Field, t: torch.Tensor) -> torch.Tensor:
        if callable(field) and not isinstance(field, torch.Tensor):
            return field(t)
        n_pieces = field.shape[0]
        # Piece k covers [k T/K, (k+1) T/K); t = T belongs to the last piece.
        index = torch.floor(t * (n_pieces / self.T)).long().clamp(0, n_pieces - 1)
        return field[index.to(field.device)]

    def vector_field(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """f(t, x) = w(t) x + b(t) + g(x); t (batch, 1) (the odeint convention) or (batch,)."""
        # odeint passes t shaped (batch, 1) to broadcast against x; the tables index by (batch,)
        t = t.reshape(t.shape[0]) if t.dim() > 1 else t
        w = self.w_at(t)
        b = self.b_at(t)
        linear = x @ w.T if w.dim() == 2 else torch.einsum("bij,bj->bi", w, x)
        return linear + b + self.g(x)

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.vector_field(t, x)


class _GFromH:
    """g(x) = (h(x) − x) / Δt: the nonlinear rate of a layer's h. Keeps h for the way back."""

    def __init__(self, h: Callable[[torch.Tensor], torch.Tensor], dt: float) -> None:
        self.h, self.dt = h, dt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.h(x) - x) / self.dt

    def __repr__(self) -> str:
        return f"g from h={self.h!r} with dt={self.dt!r}"


class _HFromG:
    """h(x) = x + Δt g(x): one Euler step of the nonlinear part. Keeps g for the way back."""

    def __init__(self, g: Callable[[torch.Tensor], torch.Tensor], dt: float) -> None:
        self.g, self.dt = g, dt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dt * self.g(x)

    def __repr__(self) -> str:
        return f"h = x + {self.dt!r} g(x), g={self.g!r}"


def layers_to_ode(stack: LayerStack, T: float = 1.0) -> LayerODE:
    """The ODE (1) whose L-step splitting is exactly `stack`.

    With Δt = T / L: w_l = (W_l − I) / Δt, b_l = B_l / Δt (piecewise constant on the L
    intervals) and g(x) = (h(x) − x) / Δt.

    Arguments:
        stack: the layers.
        T: the time the stack spans, > 0.

    Returns:
        A LayerODE with tensor w (L, d, d) and b (L, d).

    Raises:
        TypeError / ValueError: for a stack that is not a LayerStack or T <= 0.

    Round trip: `ode_to_layers(layers_to_ode(s, T))` returns s's weights and biases bit for bit
    when Δt is a power of two and the diagonal of each W_l lies in [0.5, 2] (then W − I and
    the scalings by Δt are exact in floating point, Sterbenz), and the same h object; in
    general they agree to a few ulp.
    """
    if not isinstance(stack, LayerStack):
        raise TypeError(f"stack must be a LayerStack, got {type(stack).__name__}.")
    T = check_positive("T", T)
    dt = T / stack.n_layers
    eye = torch.eye(stack.dim, dtype=stack.weights.dtype, device=stack.weights.device)
    w = (stack.weights - eye) / dt
    b = stack.biases / dt
    # Undo an earlier ode_to_layers exactly instead of wrapping twice.
    g = stack.h.g if isinstance(stack.h, _HFromG) and stack.h.dt == dt else _GFromH(stack.h, dt)
    return LayerODE(w=w, b=b, g=g, T=T)


def ode_to_layers(ode: LayerODE, n_layers: int | None = None) -> LayerStack:
    """The L-layer network that steps (1): W_l = I + Δt w(t_l), B_l = Δt b(t_l), h = x + Δt g.

    Arguments:
        ode: the ODE.
        n_layers: L. Defaults to the number of pieces K of a piecewise-constant w; required
            when w or b is a callable. With tensors, L must be a multiple of K (each layer
            then lies inside one piece).

    Returns:
        A LayerStack with Δt = T / L and t_l = l Δt (left end of each layer's interval).

    Raises:
        ValueError: n_layers missing for callable w/b, or not a multiple of K.
    """
    if not isinstance(ode, LayerODE):
        raise TypeError(f"ode must be a LayerODE, got {type(ode).__name__}.")
    pieces = [f.shape[0] for f in (ode.w, ode.b) if isinstance(f, torch.Tensor)]
    if n_layers is None:
        if len(pieces) != 2:
            raise ValueError(
                "n_layers is required when w or b is a callable of t; pass e.g. n_layers=100."
            )
        n_layers = pieces[0]
    n_layers = check_positive_int("n_layers", n_layers)
    for k in pieces:
        if n_layers % k:
            raise ValueError(
                f"n_layers={n_layers} must be a multiple of the {k} pieces of the piecewise-"
                f"constant w/b, so that each layer lies inside one piece; pass n_layers={k}."
            )
    dt = ode.T / n_layers
    weights = _sample(ode.w, ode, n_layers, per_time_dim=3)
    biases = _sample(ode.b, ode, n_layers, per_time_dim=2)
    if weights.dtype != biases.dtype:
        weights, biases = (v.to(torch.promote_types(weights.dtype, biases.dtype))
                           for v in (weights, biases))
    dim = weights.shape[-1]
    eye = torch.eye(dim, dtype=weights.dtype, device=weights.device)
    h = ode.g.h if isinstance(ode.g, _GFromH) and ode.g.dt == dt else _HFromG(ode.g, dt)
    return LayerStack(weights=eye + dt * weights, biases=dt * biases, h=h)


def _sample(field: Field, ode: LayerODE, n_layers: int, per_time_dim: int) -> torch.Tensor:
    """field at t_l = l Δt for l = 0..L−1, one row a layer (t in float64)."""
    if isinstance(field, torch.Tensor):
        return field.repeat_interleave(n_layers // field.shape[0], dim=0)
    t = torch.arange(n_layers, dtype=torch.float64) * (ode.T / n_layers)
    values = field(t)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"a callable w/b must return a tensor, got {type(values).__name__}.")
    if values.dim() == per_time_dim - 1:
        # A callable that returns one shared value: the same for every layer.
        values = values.expand(n_layers, *values.shape)
    if values.dim() != per_time_dim or values.shape[0] != n_layers:
        raise ValueError(
            f"a callable w/b given t of shape ({n_layers},) must return "
            f"({n_layers}, d{', d' if per_time_dim == 3 else ''}) or a shared value, got "
            f"{tuple(values.shape)}."
        )
    return values


@dataclass(frozen=True)
class ODELikeness:
    """How close a stack is to a discretised smooth ODE (both bounded as L grows iff ODE-like).

    Attributes:
        weight_score: L · max_l ‖W_l − I‖₂ (≈ T · max_t ‖w(t)‖₂ for a stepped ODE).
        nonlinearity_score: L · sup_z |h(z) − z| over the probed range (≈ T · sup |g|).
        n_layers: L.
    """

    weight_score: float
    nonlinearity_score: float
    n_layers: int


def ode_likeness(
    stack: LayerStack, z_range: tuple[float, float] = (-1.0, 1.0), n_points: int = 1001
) -> ODELikeness:
    """Score a layer stack: L·max‖W_l − I‖ (spectral norm) and L·sup |h(z) − z|.

    Arguments:
        stack: the network.
        z_range: (lo, hi) of the pre-activation values over which to probe h; h is evaluated
            on n_points equally spaced z, each broadcast to all d coordinates.
        n_points: number of probe points (>= 2).

    Returns:
        ODELikeness. For a network from `ode_to_layers(ode, L)` both scores tend to finite
        limits (T·max‖w‖, T·sup|g|) as L grows; for a generic deep network they grow ∝ L.
    """
    if not isinstance(stack, LayerStack):
        raise TypeError(f"stack must be a LayerStack, got {type(stack).__name__}.")
    n_points = check_positive_int("n_points", n_points, minimum=2)
    lo, hi = z_range
    if not lo < hi:
        raise ValueError(f"z_range must be (lo, hi) with lo < hi, got {z_range!r}.")
    weights = stack.weights.detach()
    eye = torch.eye(stack.dim, dtype=weights.dtype, device=weights.device)
    weight_gap = torch.linalg.matrix_norm(weights - eye, ord=2).max()
    z = torch.linspace(lo, hi, n_points, dtype=weights.dtype, device=weights.device)
    z = z[:, None].expand(n_points, stack.dim)
    with torch.no_grad():
        nonlinearity_gap = (stack.h(z) - z).abs().max()
    n_layers = stack.n_layers
    return ODELikeness(
        weight_score=float(n_layers * weight_gap),
        nonlinearity_score=float(n_layers * nonlinearity_gap),
        n_layers=n_layers,
    )
