"""equilibria.mechanics: the adjoint as momentum, conserved quantities, networks as ODEs.

Seed paper: J. Ruseckas, "Differential equations as models of deep neural networks",
arXiv 1909.03767. For dx/dt = F(t, x) and a loss L(x(T)), p(t) = ∂L/∂x(t) is the momentum
conjugate to x under H = p·F: `costate` computes it, `hamiltonian` evaluates H, and the
conservation diagnostics (H drift, the H balance for time-dependent F, the p·v pairing, the
Noether charge x·p, and Liouville's phase-volume formula in `liouville`) turn Hamilton's
mechanics into checks of gradient code. The converters
read a stack of near-identity layers as the ODE dx/dt = w(t) x + b(t) + g(x) and back.
"""

from ._conservation import Balance as Balance
from ._conservation import Conservation as Conservation
from ._conservation import discrete_pairing as discrete_pairing
from ._conservation import hamiltonian_balance as hamiltonian_balance
from ._conservation import hamiltonian_drift as hamiltonian_drift
from ._conservation import noether_charge as noether_charge
from ._conservation import tangent_pairing as tangent_pairing
from ._costate import Costate as Costate
from ._costate import costate as costate
from ._costate import hamiltonian as hamiltonian
from ._feedforward import LayerODE as LayerODE
from ._feedforward import LayerStack as LayerStack
from ._feedforward import ODELikeness as ODELikeness
from ._feedforward import layers_to_ode as layers_to_ode
from ._feedforward import ode_likeness as ode_likeness
from ._feedforward import ode_to_layers as ode_to_layers
from ._liouville import PhaseVolume as PhaseVolume
from ._liouville import liouville as liouville
