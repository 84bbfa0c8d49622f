"""Shared ODE problem set: batched vector fields with closed forms or scipy references.

Each `Problem` has a batched field ``f(t, y)`` (t of shape (batch, 1), y of shape (batch, d)),
a batch of initial states, a time span and ``reference(t_points)`` giving the true solution
at those times, shape (len(t_points), batch, d), float64 — from a closed form, or from
scipy's DOP853 at rtol 1e-12, atol 1e-14.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.linalg import expm


@dataclass(frozen=True)
class Problem:
    name: str
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    f_numpy: Callable[[float, np.ndarray], np.ndarray]
    y0: tuple[tuple[float, ...], ...]
    t_span: tuple[float, float]
    closed_form: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def initial(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        return torch.tensor(self.y0, dtype=dtype, device=device)

    def reference(self, t_points, t_span=None) -> torch.Tensor:
        """True solution at t_points, (len(t_points), batch, d) float64."""
        t_points = np.atleast_1d(np.asarray(t_points, dtype=np.float64))
        t0 = (t_span or self.t_span)[0]
        rows = []
        for y0 in self.y0:
            y0 = np.asarray(y0, dtype=np.float64)
            if self.closed_form is not None:
                rows.append(self.closed_form(t_points - t0, y0))
                continue
            sol = solve_ivp(
                self.f_numpy, (t0, float(t_points[-1])), y0, method="DOP853", rtol=1e-12,
                atol=1e-14, t_eval=t_points,
            )
            if not sol.success:
                raise RuntimeError(f"scipy reference failed for {self.name}: {sol.message}")
            rows.append(sol.y.T)
        return torch.tensor(np.stack(rows, axis=1))


# Linear y' = A y with a damped rotation: closed form y(t) = expm(A t) y0.
_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
_A_T = torch.tensor(_A)


def _linear(t, y):
    return y @ _A_T.to(y).T


LINEAR = Problem(
    name="linear",
    f=_linear,
    f_numpy=lambda t, y: _A @ y,
    y0=((1.0, 0.0), (0.5, -1.5), (2.0, 1.0)),
    t_span=(0.0, 5.0),
    closed_form=lambda dt, y0: np.stack([expm(_A * s) @ y0 for s in dt]),
)


def _vdp(t, y, mu=1.0):
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, mu * (1 - x * x) * v - x], dim=1)


VAN_DER_POL = Problem(
    name="van_der_pol",
    f=_vdp,
    f_numpy=lambda t, y: np.array([y[1], (1 - y[0] ** 2) * y[1] - y[0]]),
    y0=((2.0, 0.0), (0.5, 0.5), (-1.0, 2.0)),
    t_span=(0.0, 6.0),
)


def _lotka(t, y):
    prey, pred = y[:, 0], y[:, 1]
    return torch.stack([1.5 * prey - prey * pred, prey * pred - 3.0 * pred], dim=1)


LOTKA_VOLTERRA = Problem(
    name="lotka_volterra",
    f=_lotka,
    f_numpy=lambda t, y: np.array([1.5 * y[0] - y[0] * y[1], y[0] * y[1] - 3.0 * y[1]]),
    y0=((1.0, 1.0), (3.0, 2.0), (2.0, 0.5)),
    t_span=(0.0, 5.0),
)


def _forced(t, y):
    return -y + torch.sin(3.0 * t)


# Time-dependent field: y' = -y + sin(3t); closed form for t0 = 0.
def _forced_closed(dt, y0):
    c = 1.0 / 10.0  # particular solution (sin 3t - 3 cos 3t) / 10
    part = lambda s: c * (np.sin(3 * s) - 3 * np.cos(3 * s))  # noqa: E731
    return np.stack([(y0 - part(0.0)) * np.exp(-s) + part(s) for s in dt])


FORCED = Problem(
    name="forced",
    f=_forced,
    f_numpy=lambda t, y: -y + np.sin(3.0 * t),
    y0=((1.0,), (-0.5,), (0.0,)),
    t_span=(0.0, 4.0),
    closed_form=_forced_closed,
)

ADAPTIVE_PROBLEMS = [LINEAR, VAN_DER_POL, LOTKA_VOLTERRA, FORCED]


class MLPField(torch.nn.Module):
    """A parameterised tanh MLP vector field f(t, y) = W2 tanh(W1 y + b1 + t w_t) + b2."""

    def __init__(self, dim: int = 3, hidden: int = 8, dtype=torch.float64, scale: float = 1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self.w1 = torch.nn.Parameter(scale * torch.randn(hidden, dim, generator=gen,
                                                         dtype=dtype) / dim**0.5)
        self.b1 = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=gen, dtype=dtype))
        self.wt = torch.nn.Parameter(0.5 * torch.randn(hidden, generator=gen, dtype=dtype))
        self.w2 = torch.nn.Parameter(scale * torch.randn(dim, hidden, generator=gen,
                                                         dtype=dtype) / hidden**0.5)
        self.b2 = torch.nn.Parameter(0.1 * torch.randn(dim, generator=gen, dtype=dtype))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(y @ self.w1.T + self.b1 + t * self.wt)
        return hidden @ self.w2.T + self.b2


def central_difference(loss, tensors, directions, h: float = 1e-5) -> float:
    """(loss() at x + h d  -  loss() at x - h d) / 2h, the tensors x shifted in place along the
    directions d (and restored): a float64 directional derivative to check gradients."""
    with torch.no_grad():
        def at(sign: float) -> float:
            for x, d in zip(tensors, directions):
                x.add_(sign * h * d)
            try:
                return float(loss())
            finally:
                for x, d in zip(tensors, directions):
                    x.sub_(sign * h * d)

        return (at(1.0) - at(-1.0)) / (2 * h)
