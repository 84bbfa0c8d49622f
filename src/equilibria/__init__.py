"""equilibria: deep equilibrium models in PyTorch.

A fixed point z* = f(z*, x) is the steady state of the neural ODE dz/dt = f(z, x) - z: find it
by integrating that ODE (SteadyState) or by root-finding (Picard, Anderson, Broyden,
NewtonKrylov), and train through it with implicit differentiation. See DESIGN.md.
"""

from ._solution import EquilibriaError as EquilibriaError
from ._solution import Solution as Solution
from ._solution import Status as Status

# --- ode (owned by the ODE core) ---
from .nn.neural_ode import NeuralODE as NeuralODE
from .ode import RK4 as RK4
from .ode import Adjoint as Adjoint
from .ode import Backprop as Backprop
from .ode import Bosh3 as Bosh3
from .ode import ButcherTableau as ButcherTableau
from .ode import DenseOutput as DenseOutput
from .ode import Dopri5 as Dopri5
from .ode import Dopri8 as Dopri8
from .ode import ESDIRKTableau as ESDIRKTableau
from .ode import Euler as Euler
from .ode import Event as Event
from .ode import ExplicitRK as ExplicitRK
from .ode import Heun as Heun
from .ode import ImplicitRK as ImplicitRK
from .ode import Kvaerno3 as Kvaerno3
from .ode import Kvaerno5 as Kvaerno5
from .ode import Midpoint as Midpoint
from .ode import Newton as Newton
from .ode import PIController as PIController
from .ode import Tsit5 as Tsit5
from .ode import odeint as odeint
from .ode import odeint_adjoint as odeint_adjoint

# --- linear + equilibrium (owned by the equilibrium solvers) ---
# isort: split
from .equilibrium import Anderson as Anderson
from .equilibrium import Broyden as Broyden
from .equilibrium import Captured as Captured
from .equilibrium import ImplicitEuler as ImplicitEuler
from .equilibrium import NewtonKrylov as NewtonKrylov
from .equilibrium import Picard as Picard
from .equilibrium import SteadyState as SteadyState
from .equilibrium import fixed_point as fixed_point
from .linear import GMRES as GMRES

# --- nn (owned by the DEQ layer) ---
# isort: split
from .nn import DEQ as DEQ
from .nn import Implicit as Implicit
from .nn import OneStep as OneStep
from .nn import Phantom as Phantom
from .nn import Reversible as Reversible
from .nn import Unrolled as Unrolled
from .nn import VariationalDropout as VariationalDropout
from .nn import VariationalDropout2d as VariationalDropout2d
from .nn import correction_loss as correction_loss
from .nn import jacobian_penalty as jacobian_penalty
from .nn import spectral_radius as spectral_radius

# --- mechanics (owned by mechanics) ---
# isort: split
from . import mechanics as mechanics

__version__ = "0.1.0"
