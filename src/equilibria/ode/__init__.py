"""equilibria.ode: batched Runge–Kutta integration (explicit, and implicit ESDIRK for stiff
problems) with per-sample step control.

Vector fields are called ``f(t, y)`` with ``y`` of shape (batch, ...) and ``t`` a tensor of
shape (batch, 1, ..., 1) that broadcasts against y (each sample has its own time, and code
written for a scalar time, ``torch.sin(t) * y``, is right as it stands); see `rk_step`.
"""

from ._adjoint import Adjoint as Adjoint
from ._adjoint import AdjointTrajectory as AdjointTrajectory
from ._adjoint import Backprop as Backprop
from ._adjoint import adjoint_trajectory as adjoint_trajectory
from ._controller import PIController as PIController
from ._dense_output import DenseOutput as DenseOutput
from ._esdirk_tableau import ESDIRKTableau as ESDIRKTableau
from ._events import Event as Event
from ._implicit import ImplicitRK as ImplicitRK
from ._implicit import Kvaerno3 as Kvaerno3
from ._implicit import Kvaerno5 as Kvaerno5
from ._implicit import Newton as Newton
from ._implicit import esdirk_stages as esdirk_stages
from ._integrate import odeint as odeint
from ._odeint_adjoint import odeint_adjoint as odeint_adjoint
from ._rk import rk_step as rk_step
from ._solvers import RK4 as RK4
from ._solvers import Bosh3 as Bosh3
from ._solvers import Dopri5 as Dopri5
from ._solvers import Dopri8 as Dopri8
from ._solvers import Euler as Euler
from ._solvers import ExplicitRK as ExplicitRK
from ._solvers import Heun as Heun
from ._solvers import Midpoint as Midpoint
from ._solvers import RungeKutta as RungeKutta
from ._solvers import Tsit5 as Tsit5
from ._tableau import ButcherTableau as ButcherTableau
