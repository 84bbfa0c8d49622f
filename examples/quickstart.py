"""The README's quick start, runnable: `.venv/bin/python examples/quickstart.py`."""

import math

import torch
from torch import nn

import equilibria as eq

torch.manual_seed(0)

# cos z = z from z0 = -1: as the steady state of dz/dt = cos z - z, and by Anderson mixing.
z0 = torch.full((4, 1), -1.0, dtype=torch.float64)
for solver in (eq.SteadyState(), eq.Anderson(m=5)):
    sol = eq.fixed_point(torch.cos, z0, solver=solver,  # x=None: f is called as f(z)
                         atol=1e-10, rtol=1e-10)
    print(type(solver).__name__, sol.value[0].item(), sol.status.tolist(),
          sol.stats["nfe"].tolist(), sol.stats["residual"].max().item())


# A DEQ layer: the forward solve integrates dz/dt = f(z, x) - z to its steady state with
# Tsit5; the backward solves the steady-state adjoint by GMRES and stores no iterations.
class Cell(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.linear(z) + x)


deq = eq.DEQ(Cell(), solver=eq.SteadyState(eq.Tsit5()),
             backward=eq.Implicit(linear_solver=eq.GMRES()))
x = torch.randn(32, 64)
z_star = deq(x)
z_star.square().mean().backward()
print("DEQ forward nfe (mean):", deq.last_solution.stats["nfe"].float().mean().item(),
      "status:", set(deq.last_solution.status.tolist()))

# A finite-time neural ODE trained with the continuous adjoint (memory flat in the steps).
class Field(nn.Module):  # called as f(t, y); t has shape (batch,): each sample its own time
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, t, y):
        return self.net(y)


node = eq.NeuralODE(Field(), t_span=(0.0, 1.0), solver=eq.Dopri5(), gradient=eq.Adjoint())
node(torch.randn(16, 2)).sum().backward()
print("NeuralODE nfe (mean):", node.last_solution.stats["nfe"].float().mean().item())

# odeint: per-sample steps and statuses; y' = -y has y(1) = exp(-1).
sol = eq.odeint(lambda t, y: -y, torch.ones(3, 2, dtype=torch.float64), t_span=(0.0, 1.0),
                solver=eq.Tsit5(), rtol=1e-8, atol=1e-10)
print("odeint:", sol.value[0, 0].item(), "vs", math.exp(-1.0))
