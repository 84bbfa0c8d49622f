"""The seed's first DEQ: learn y = 2x with a linear cell, solved as an ODE steady state."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Linear2xCell", "Linear2xDEQ"]


class Linear2xCell(nn.Module):
    """f(z, x) = Linear(5 -> 1)(Linear(1 -> 5)(z + x)), no activation.

    The composition is affine, f = a (z + x) + b with a = w2 . w1, so the equilibrium is
    z* = (a x + b) / (1 - a): y = 2x needs a = 2/3, b = 0, and then the model extrapolates
    exactly (deq(-5) = -10). The ODE dz/dt = f(z + x) - z converges when a < 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(1, 5)
        self.outer = nn.Linear(5, 1)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(z + x))


class Linear2xDEQ(nn.Module):
    """x (batch, 1) -> z* (batch, 1) with z* = f(z*, x); z0 = 0."""

    def __init__(self, deq_factory) -> None:
        super().__init__()
        self.cell = Linear2xCell()
        self.deq = deq_factory(self.cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deq(x, z0=torch.zeros_like(x))

    def vector_field(self, t: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dz/dt = f(z, x) - z, as eq.odeint's f(t, y, *args) (pass args=(x,)) for plots."""
        return self.cell(z, x) - z
