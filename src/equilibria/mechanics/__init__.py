"""equilibria.mechanics: the adjoint as momentum, conserved quantities, networks as ODEs.

Seed paper: J. Ruseckas, "Differential equations as models of deep neural networks",
arXiv 1909.03767. For dx/dt = F(t, x) and a loss L(x(T)), p(t) = ∂L/∂x(t) is the momentum
conjugate to x under H = p·F: `costate` computes it, `hamiltonian` evaluates H, and the
conservation diagnostics (H drift, the H balance for time-dependent F, the p·v pairing, the
Noether charge x·p) turn Hamilton's mechanics into checks of gradient code. The converters
read a stack of near-identity layers as the ODE dx/dt = w(t) x + b(t) + g(x) and back.
"""

from ._feedforward import LayerODE as LayerODE
from ._feedforward import LayerStack as LayerStack
from ._feedforward import ODELikeness as ODELikeness
from ._feedforward import layers_to_ode as layers_to_ode
from ._feedforward import ode_likeness as ode_likeness
from ._feedforward import ode_to_layers as ode_to_layers
