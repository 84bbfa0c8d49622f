"""DEQ: a layer whose output is the fixed point z* = f(z*, x) of a module f.

Forward: a fixed-point solver (any of `equilibria.equilibrium`'s, the ODE steady state
included) finds z* per sample. Backward: a strategy object (`Implicit`, `Unrolled`,
`OneStep`, `Phantom`) decides how the gradient is obtained; see `_backward.py`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .._autocast import autocast_dtype, under_autocast
from .._checks import check_positive, check_positive_int, check_tolerances
from .._context import call_scope
from .._solution import EquilibriaError, Solution, Status
from .._structure import Structure
from ..equilibrium._anderson import Anderson
from ..equilibrium._loop import fixed_point
from ..equilibrium._solver import FixedPointSolver
from ..equilibrium._steady_state import SteadyState
from ..ode import RungeKutta
from ._backward import BACKWARD_TYPES, Implicit, Unrolled
from ._deq_state import (
    check_state,
    check_z_shape,
    explain_first_failure,
    is_structured_shape,
    shape_of,
    state_steps,
)
from ._dropout import stochastic_modules
from ._parametrize import SolveScope
from ._penalty import spectral_radius
from ._reversible import Reversible

__all__ = ["AUTOCAST_RTOL_FLOOR", "DEQ", "EXPLICIT_AMP_COST"]

_SOLVER_CHOICES = "eq.Anderson(), eq.Picard(), eq.Broyden(), eq.NewtonKrylov(), eq.SteadyState()"
_BACKWARD_CHOICES = "eq.Implicit(), eq.Unrolled(), eq.OneStep(), eq.Phantom(), eq.Reversible()"
# The smallest rtol worth asking for when f runs under autocast, about eps/2 of the dtype.
# Measured with Anderson on tanh(W z + U x + b) cells (||W|| = 0.6, widths 48 and 512, 64
# samples, 100 steps): the worst sample's relative residual stalled at 1.1e-3 under bfloat16
# and 1.1e-4 under float16 (medians 2.5e-4 and 3e-5), so these leave a margin of ~4.
AUTOCAST_RTOL_FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4}
# Measured on the seed MNIST cell (batch 128, rtol 4e-3): SteadyState(Tsit5()) took 48.8
# evaluations per sample in float32, 131 under float16 and 513 under bfloat16 autocast;
# SteadyState() (implicit Euler), Anderson and Picard took the same number in all three.
EXPLICIT_AMP_COST = "2.7x the evaluations under float16, 10x under bfloat16, measured"


def _uses_explicit_steady_state(solver: FixedPointSolver) -> bool:
    """Whether `solver` integrates the steady state with an explicit Runge-Kutta method."""
    return isinstance(solver, SteadyState) and isinstance(solver.solver, RungeKutta)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}.")
    return value


def _first_tensor(x: Any) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and all(isinstance(item, torch.Tensor) for item in x):
        return x[0]
    raise TypeError(
        f"x must be a tensor, a tuple of tensors (batch in dim 0) or None, got "
        f"{type(x).__name__}."
    )


class DEQ(nn.Module):
    """Deep equilibrium layer: ``z_star = deq(x)`` solves z* = f_module(z*, x) per sample.

    Stacking the same layer z ← f(z, x) infinitely often gives a network of infinite depth
    whose output is the fixed point; equivalently, z* is the steady state of the neural ODE
    dz/dt = f(z, x) − z. The forward solve runs without a graph (except for `Unrolled`); the
    gradient comes from the `backward` strategy.

    Arguments:
        f_module: an nn.Module called as ``f_module(z, x)``, returning a tensor of z's shape
            and dtype; each sample's row must depend on that sample's z and x only.
        solver: a fixed-point solver object (default ``Anderson()``: fewest evaluations of f
            on the library's benchmark; ``SteadyState(...)`` integrates dz/dt = f − z, which
            also converges where ∂f/∂z has eigenvalues of modulus > 1 but real part < 1).
        backward: ``Implicit()`` (default; exact gradient, O(1) memory in forward steps),
            ``Unrolled()``, ``OneStep()``, ``Phantom(k, damping)``, or ``Reversible(beta)``
            (RevDEQ: iterates itself under atol/rtol/max_steps, so leave solver unset; the
            exact gradient of that iteration, memory ~O(1) in steps).
        init: optional nn.Module g, the Skip DEQ (Pal et al. 2022): the explicit prediction
            z0 = g(x) starts the solve. Train g with ``deq.skip_loss()`` added to the loss.
        atol, rtol: per-sample tolerance of the forward solve,
            RMS(f(z, x) − z) <= atol + rtol · RMS(z) (defaults 1e-6, 1e-4: ample for
            training, a 1e-4 relative residual is well below SGD noise).
        max_steps: bound on forward solver steps (default 100).
        z_shape: per-sample shape of z, when it differs from x's (or x is a tuple whose first
            tensor is not z-shaped); a tuple of shapes declares a multi-scale state, e.g.
            ``((8, 16, 16), (16, 8, 8))``: f_module then receives and returns a tuple of
            tensors, and so does the DEQ (one tolerance test per sample over every slot).
            Default: z is shaped like x (or x[0]).
        compact: evaluate f only on samples still running (see ``fixed_point``). Leave False
            when f mixes samples (e.g. BatchNorm in train mode).
        throw: raise ``EquilibriaError`` when a forward or backward solve fails for a sample,
            instead of recording it in the stats (and warning, for the backward).
        spectral_radius_iters: when > 0, estimate the spectral radius of ∂f/∂z at z* with
            that many Arnoldi (power-iteration) products after each forward solve and store
            it as ``last_solution.stats["spectral_radius"]`` (batch,) (costs that many VJPs).
        eval_max_steps: the step bound in eval mode (default: max_steps).

    Call: ``deq(x, z0=None, *, n_states=None, solver=None, atol=None, rtol=None,
    max_steps=None, trace=False)`` with x a tensor, a tuple of tensors or None (then z0 is
    needed; f_module receives None). ``z0`` (batch, *z_shape), or a tuple for a multi-scale
    state, warm-starts the solve (e.g. a sample's fixed point from the previous epoch) and
    takes precedence over ``init`` and the default zeros. ``solver``, ``atol``, ``rtol``,
    ``max_steps`` override the layer's for this call; ``trace=True`` keeps each step's
    residual in ``last_solution.trace``.

    Fixed-point correction: ``n_states=k`` returns a list of k states, z* last. State i < k
    is each sample's value after solver step round(i · max_steps / k) (its best iterate so
    far; a sample that stopped earlier gives its final value), as TorchDEQ's ``n_states``;
    it carries a one-step gradient, being f(z_i, x) with z_i held constant (Unrolled: the
    recorded graph itself). z* carries the backward strategy's gradient. Combine the states
    with ``eq.correction_loss``.

    Inside f_module: torch parametrizations (weight_norm, spectral_norm, ...) are evaluated
    once for the solve and once, with grad, for the backward's graph (spectral norm's power
    iteration advances once per call); ``eq.VariationalDropout`` keeps one mask per sample
    for the whole call; a torch dropout layer in train mode gets a one-time warning.

    Returns: (batch, ...) z* (a tuple for a multi-scale state; a list of states with
    n_states). With grad enabled it carries the strategy's gradient to
    f_module's parameters and to x (also when x does not require grad); for Implicit and
    OneStep its value is f(z*, x), one further step from the solver's z* (the residual is
    within tolerance, so the two agree to it). Under ``torch.no_grad`` it is the solver's z*
    and nothing is recorded for backward.

    Mixed precision: under ``torch.autocast`` f_module computes in float16 / bfloat16 while
    the state z, the solver's arithmetic and the implicit backward's linear solve stay in the
    state's dtype (a low-precision z0 or g(x) is widened to the parameters' dtype). The
    residual of a low-precision f stalls near eps/2 of its dtype, so a smaller rtol (of the
    DEQ, or of ``Implicit`` with a fixed-point linear solver) warns once: use rtol >= 4e-3
    under bfloat16, >= 5e-4 under float16.

    After a call:
        ``last_solution``: the forward ``Solution`` (value z* detached, status (batch,),
            stats residual / n_steps / nfe (batch,), plus spectral_radius when asked).
        ``last_backward_stats``: None until the backward pass of the last call runs; then a
            dict with "strategy", "status" (batch,) and "nfe" (batch,) (Implicit also
            "residual" and "n_steps" of its linear solve).

    Raises:
        TypeError: f_module / init not modules, solver or backward not one of the objects
            above, x of the wrong type, unknown keyword arguments.
        ValueError: tolerances <= 0, max_steps < 1, z0 of the wrong shape, f_module returning
            the wrong shape or dtype, non-finite inputs.

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019; Pal, Edelman &
    Rackauckas, "Mixing Implicit and Explicit Deep Learning with Skip DEQs and Infinite Time
    Neural ODEs (Continuous DEQs)", 2022.
    """

    # Per-call results, not state: dropped from pickles / deepcopies (they may hold graphs).
    _TRANSIENT = ("last_solution", "last_backward_stats", "_skip_pair")

    def __init__(
        self,
        f_module: nn.Module,
        solver: FixedPointSolver | None = None,
        backward: Any = None,
        init: nn.Module | None = None,
        *,
        atol: float = 1e-6,
        rtol: float = 1e-4,
        max_steps: int = 100,
        z_shape: tuple[int, ...] | None = None,
        compact: bool = False,
        throw: bool = False,
        spectral_radius_iters: int = 0,
        eval_max_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(f_module, nn.Module):
            raise TypeError(
                f"f_module must be a torch.nn.Module called as f_module(z, x), got "
                f"{type(f_module).__name__}; wrap a function in an nn.Module so its "
                "parameters are registered."
            )
        if init is not None and not isinstance(init, nn.Module):
            raise TypeError(
                f"init must be None or an nn.Module g with z0 = g(x), got {type(init).__name__}."
            )
        if isinstance(backward, Reversible) and solver is not None:
            raise ValueError(
                f"backward=eq.Reversible() iterates itself (it is the solver too), so solver= "
                f"must be left unset, got {solver!r}; e.g. eq.DEQ(cell, backward=eq.Reversible())."
            )
        solver = Anderson() if solver is None else solver
        if not isinstance(solver, FixedPointSolver):
            raise TypeError(
                f"solver must be a solver object, got {type(solver).__name__} {solver!r}; "
                f"choose one of {_SOLVER_CHOICES}."
            )
        backward = Implicit() if backward is None else backward
        if not isinstance(backward, (*BACKWARD_TYPES, Reversible)):
            raise TypeError(
                f"backward must be a backward strategy object, got {type(backward).__name__} "
                f"{backward!r}; choose one of {_BACKWARD_CHOICES}."
            )
        self.atol, self.rtol = check_tolerances(atol, rtol)
        self.max_steps = check_positive_int("max_steps", max_steps)
        self.z_shape = None if z_shape is None else check_z_shape(z_shape)
        self.eval_max_steps = (None if eval_max_steps is None
                               else check_positive_int("eval_max_steps", eval_max_steps))
        self.compact = _check_bool("compact", compact)
        self.throw = _check_bool("throw", throw)
        self.spectral_radius_iters = check_positive_int(
            "spectral_radius_iters", spectral_radius_iters, minimum=0
        )
        self.f_module = f_module
        self.init = init
        self.solver = solver
        self.backward = backward
        self.last_solution: Solution | None = None
        self.last_backward_stats: dict[str, Any] | None = None
        self._skip_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warned_backward = False
        self._warned_autocast = False
        self._warned_stochastic = False

    def extra_repr(self) -> str:
        solver = None if isinstance(self.backward, Reversible) else self.solver  # unused then
        return (
            f"solver={solver!r}, backward={self.backward!r}, atol={self.atol}, "
            f"rtol={self.rtol}, max_steps={self.max_steps}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._TRANSIENT:
            state[name] = None
        return state

    def _start(self, x: Any, z0: Any) -> tuple[Any, Any, bool]:
        """The first iterate, g(x) when this is a Skip DEQ, and whether the first iterate was
        shaped like x by default (then a failing first call of f is probably a missing
        z_shape). States may be structured (tuples of tensors)."""
        like = _first_tensor(x)
        prediction = None
        if self.init is not None:
            if x is None:
                raise ValueError("a Skip DEQ (init=g) needs an input x: z0 = g(x).")
            prediction = self.init(x)
            check_state("init(x)", prediction)
        if z0 is not None:
            check_state("z0", z0)
            expected = self._expected_shape(like, prediction)
            if expected is not None and shape_of(z0) != expected:
                raise ValueError(
                    f"z0 must have shape {expected} (batch, *z_shape), got {shape_of(z0)}; "
                    "pass the fixed point of the same samples (e.g. deq.last_solution.value)."
                )
            return z0, prediction, False
        if prediction is not None:
            expected = self._expected_shape(like, None) if self.z_shape is not None else None
            if expected is not None and shape_of(prediction) != expected:
                raise ValueError(
                    f"init(x) must return shape {expected} (batch, *z_shape), got "
                    f"{shape_of(prediction)}."
                )
            return prediction, prediction, False
        if like is None:
            raise ValueError(
                "x is None: pass z0= (the first iterate, which also gives the batch size)."
            )
        if self.z_shape is None:
            if not like.is_floating_point():
                raise ValueError(
                    f"x has dtype {like.dtype}, so z cannot be shaped like it: pass z_shape= "
                    "(and a floating z) or z0=."
                )
            return torch.zeros_like(like), None, True
        dtype = like.dtype if like.is_floating_point() else self._parameter_dtype()
        if is_structured_shape(self.z_shape):
            return tuple(like.new_zeros((like.shape[0], *shape), dtype=dtype)
                         for shape in self.z_shape), None, False
        return like.new_zeros((like.shape[0], *self.z_shape), dtype=dtype), None, False

    def _expected_shape(self, like: torch.Tensor | None, prediction: Any) -> Any:
        if prediction is not None:
            return shape_of(prediction)
        if like is None:
            return None
        if self.z_shape is not None:
            if is_structured_shape(self.z_shape):
                return tuple((like.shape[0], *shape) for shape in self.z_shape)
            return (like.shape[0], *self.z_shape)
        return tuple(like.shape)

    def _parameter_dtype(self) -> torch.dtype:
        for parameter in self.f_module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.get_default_dtype()

    def forward(
        self,
        x: Any,
        z0: Any = None,
        *,
        n_states: int | None = None,
        solver: FixedPointSolver | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        max_steps: int | None = None,
        trace: bool = False,
    ) -> Any:
        """z* = f_module(z*, x) per sample; see the class docstring.

        Keyword overrides for this call only: ``solver``, ``atol``, ``rtol``, ``max_steps``;
        ``trace=True`` keeps the residual of every step in ``last_solution.trace``;
        ``n_states=k`` returns k states along the solver's path (see the class docstring).
        """
        self.last_backward_stats = None
        self._skip_pair = None
        settings = self._call_settings(solver, atol, rtol, max_steps, trace, n_states)
        if isinstance(x, list):  # f_module sees the same structure in the solve and after it
            x = tuple(x)
        start, prediction, shaped_like_x = self._start(x, z0)
        structure = Structure.of("z0", start)
        if structure is not None:
            start = structure.flatten(start)
            if prediction is not None:
                prediction = structure.flatten(prediction)
        f = self.f_module
        low = autocast_dtype(start.device.type)
        if low is not None:
            # f computes in low precision; the state stays wide (a Skip DEQ's g(x) comes out
            # of autocast narrow: widen it), so the solver's mixing and tests are exact.
            if start.dtype == low:
                start = start.to(self._parameter_dtype())
            if torch.finfo(start.dtype).bits > torch.finfo(low).bits:
                self._check_autocast_settings(low, settings)
                # the solver mixes, tests and stores iterates in the state's dtype
                f = under_autocast(f, start.device.type, low, start.dtype)
        if structure is not None:
            f = structure.wrap(f, "f_module")
        if shaped_like_x:
            f = explain_first_failure(f, tuple(start.shape))
        if self.training and not self._warned_stochastic:
            self._warn_stochastic()
        token = object()  # this call: per-call state inside f (dropout masks) keys on it
        with call_scope(token), SolveScope(self.f_module) as scope:
            z_star, solution, states = self._solve(f, start, x, settings, scope, token)
            solution = Solution(
                value=solution.value.detach(), status=solution.status,
                stats=dict(solution.stats), trace=solution.trace,
            )
            if self.spectral_radius_iters:  # in the call: the same dropout masks and weights
                solution.stats["spectral_radius"] = spectral_radius(
                    f, solution.value, x, n_iters=self.spectral_radius_iters
                )
        if prediction is not None:
            self._skip_pair = (prediction, solution.value)
        if structure is not None:
            solution.value = structure.unflatten(solution.value)
            z_star = structure.unflatten(z_star)
            states = [structure.unflatten(state) for state in states]
        self.last_solution = solution
        if settings["n_states"] is None:
            return z_star
        return [*states, z_star]

    def _call_settings(self, solver: Any, atol: Any, rtol: Any, max_steps: Any, trace: Any,
                       n_states: Any) -> dict[str, Any]:
        """This call's solver settings: the layer's, or the call's overrides (checked)."""
        if solver is not None and not isinstance(solver, FixedPointSolver):
            raise TypeError(
                f"solver must be a solver object, got {type(solver).__name__} {solver!r}; "
                f"choose one of {_SOLVER_CHOICES}."
            )
        budget = self.max_steps if self.training or self.eval_max_steps is None else (
            self.eval_max_steps)
        settings = {
            "solver": self.solver if solver is None else solver,
            "atol": self.atol if atol is None else check_positive("atol", atol),
            "rtol": self.rtol if rtol is None else check_positive("rtol", rtol),
            "max_steps": budget if max_steps is None else check_positive_int("max_steps",
                                                                              max_steps),
            "trace": _check_bool("trace", trace),
            "n_states": None if n_states is None else check_positive_int("n_states", n_states),
        }
        if settings["n_states"] is not None and settings["n_states"] > settings["max_steps"]:
            raise ValueError(
                f"n_states ({n_states}) must be <= max_steps ({settings['max_steps']}): states "
                "are taken at distinct solver steps."
            )
        return settings

    def _solve(self, f: Any, start: torch.Tensor, x: Any, settings: dict[str, Any],
               scope: SolveScope, token: object,
               ) -> tuple[torch.Tensor, Solution, list[torch.Tensor]]:
        """Solve and attach the backward strategy (on the packed state)."""
        if x is None:  # fixed_point calls f(z) when x is None

            def fn(z: torch.Tensor) -> torch.Tensor:
                return f(z, None)
        else:
            fn = f
        n_states = settings["n_states"]
        keep = state_steps(n_states, settings["max_steps"]) if n_states else ()

        def solve(first: torch.Tensor) -> Solution:
            return scope.solve(lambda: fixed_point(
                fn, first, x, solver=settings["solver"], atol=settings["atol"],
                rtol=settings["rtol"], max_steps=settings["max_steps"], throw=self.throw,
                compact=self.compact, trace=settings["trace"], keep_steps=keep,
            ))

        if isinstance(self.backward, Reversible):  # its own iteration, under these limits
            if n_states or settings["trace"]:
                raise ValueError(
                    "n_states= and trace= need the fixed_point loop; Reversible() runs its own "
                    "coupled iteration. Use another backward strategy for them."
                )

            inner = f

            def in_this_call(z: torch.Tensor, inputs: Any) -> torch.Tensor:
                # its backward re-evaluates f after the call: same dropout masks
                with call_scope(token):
                    return inner(z, inputs)

            f = in_this_call
            solve = self.backward.bind(
                f, x, self.f_module.parameters(), atol=settings["atol"],
                rtol=settings["rtol"], max_steps=settings["max_steps"], throw=self.throw,
                compact=self.compact,
            )
        if start.shape[0] == 0:  # an empty batch: nothing to solve, f's graph for autograd
            solution = solve(start)
            z_star = f(start, x) if torch.is_grad_enabled() else solution.value
        elif torch.is_grad_enabled():
            z_star, solution = self.backward.attach(f, start, x, solve, self._record_backward)
        else:
            solution = solve(start)
            z_star = solution.value
        states = list(solution.stats.pop("kept", ()))
        if states and torch.is_grad_enabled() and not isinstance(self.backward, Unrolled):
            # An earlier state carries a one-step gradient from where it was taken: the
            # value f(z_i, x), differentiable in f's parameters and x (z_i held constant).
            states = [f(state.detach(), x) for state in states]
        return z_star, solution, states

    def _warn_stochastic(self) -> None:
        found = stochastic_modules(self.f_module)
        if not found:
            return
        self._warned_stochastic = True
        warnings.warn(
            f"DEQ f_module draws a new random mask at every evaluation in train mode: "
            f"{', '.join(found)}. The map then changes between iterations, so the solve "
            "chases a moving fixed point (samples end at max_steps). Use "
            "eq.VariationalDropout(p) (or eq.VariationalDropout2d for channels): one mask per "
            "sample per DEQ call. (warned once per DEQ)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _check_autocast_settings(self, low: torch.dtype, settings: dict[str, Any]) -> None:
        """Warn once about settings that f's rounding under autocast makes wasteful: an rtol
        below what a residual can reach (samples run to max_steps), or an explicit RK
        steady state (its step control measures the rounding as error)."""
        if getattr(self, "_warned_autocast", False):
            return
        floor = AUTOCAST_RTOL_FLOOR.get(low, torch.finfo(low).eps / 2)
        changes = []
        if settings["rtol"] < floor:
            changes.append(f"DEQ(rtol={settings['rtol']:g}) -> DEQ(..., rtol={floor:.0e})")
        backward = self.backward
        if isinstance(backward, Implicit) and isinstance(backward.linear_solver,
                                                         FixedPointSolver):
            backward_rtol = backward._tolerances()[1]
            if backward_rtol < floor:
                changes.append(
                    f"Implicit(rtol={backward_rtol:g}) -> Implicit(linear_solver="
                    f"{type(backward.linear_solver).__name__}(), rtol={floor:.0e})"
                )
        if _uses_explicit_steady_state(settings["solver"]):
            changes.append(
                f"{settings['solver']!r} -> SteadyState() or Anderson() (an explicit Runge-Kutta "
                f"step control counts the rounding of f as local error: {EXPLICIT_AMP_COST})"
            )
        if not changes:
            return
        self._warned_autocast = True
        warnings.warn(
            f"DEQ under autocast({low}): f's output is rounded to {low} (relative residuals "
            f"below ~{floor:.0e} are rarely reached; stalled samples run to their step bound, "
            f"and Unrolled gradients through stalled steps can overflow). Change: "
            f"{'; '.join(changes)}. (warned once per DEQ)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _record_backward(self, stats: dict[str, Any]) -> None:
        """Keep the backward stats; raise (throw=True) or warn once when samples failed."""
        self.last_backward_stats = stats
        status = stats["status"]
        failed = ~((status == Status.SUCCESS) | (status == Status.EVENT))
        if not bool(failed.any()):
            return
        kind = "linear" if stats["strategy"] == "Implicit" else "fixed_point"
        message = Solution(value=status, status=status).failure_message(kind)
        text = (
            f"DEQ {stats['strategy']} backward did not converge for {int(failed.sum())}/"
            f"{status.numel()} samples; their gradient uses the best iterate. Every call's "
            f"backward status is in deq.last_backward_stats.\n{message}"
        )
        if self.throw:
            raise EquilibriaError(text)
        if not self._warned_backward:
            self._warned_backward = True  # once per DEQ: training loops would flood the log
            warnings.warn(text + "\n(warned once per DEQ)", RuntimeWarning, stacklevel=2)

    def skip_loss(self) -> torch.Tensor:
        """Skip DEQ auxiliary loss of the last call: mean over samples of RMS²(g(x) − z*).

        z* is a constant here, so the loss trains the explicit net g only, pulling its
        prediction towards the equilibrium so the next solves start closer (Pal et al. 2022).
        Use ``loss = task_loss + weight * deq.skip_loss()`` (weight ≈ 0.1–1).

        Raises:
            ValueError: this DEQ has no init module, or has not been called yet.
        """
        if self.init is None:
            raise ValueError("skip_loss() needs a Skip DEQ: construct DEQ(f, init=g_module).")
        if self._skip_pair is None:
            raise ValueError("skip_loss() is available after a forward call: call deq(x) first.")
        prediction, z_star = self._skip_pair
        difference = (prediction - z_star.to(prediction.dtype)).reshape(prediction.shape[0], -1)
        return difference.pow(2).mean(dim=1).mean()
