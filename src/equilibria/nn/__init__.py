"""equilibria.nn: layers (DEQ, NeuralODE), DEQ backward strategies, Jacobian diagnostics."""

# --- deq (owned by the DEQ layer) ---
from ._backward import Implicit as Implicit
from ._backward import OneStep as OneStep
from ._backward import Phantom as Phantom
from ._backward import Unrolled as Unrolled
from ._correction import correction_loss as correction_loss
from ._dropout import VariationalDropout as VariationalDropout
from ._dropout import VariationalDropout2d as VariationalDropout2d
from ._penalty import jacobian_penalty as jacobian_penalty
from ._penalty import spectral_radius as spectral_radius
from ._reversible import Reversible as Reversible
from .deq import DEQ as DEQ

# --- neural_ode (owned by the ODE core) ---
from .neural_ode import NeuralODE as NeuralODE
