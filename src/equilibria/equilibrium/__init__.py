"""equilibria.equilibrium: fixed_point() and its solvers."""

from ._anderson import Anderson as Anderson
from ._broyden import Broyden as Broyden
from ._captured import Captured as Captured
from ._loop import fixed_point as fixed_point
from ._newton_krylov import NewtonKrylov as NewtonKrylov
from ._picard import Picard as Picard
from ._pseudo_transient import ImplicitEuler as ImplicitEuler
from ._solver import FixedPointSolver as FixedPointSolver
from ._steady_state import SteadyState as SteadyState
