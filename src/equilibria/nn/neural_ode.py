"""NeuralODE: a layer whose output is the solution of dy/dt = f_module(t, y) at t1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import check_batched_state, check_positive_int, check_tolerances
from .._solution import Solution
from ..ode import Dopri5, Event, ImplicitRK, RungeKutta, odeint
from ..ode._adjoint import Adjoint, Backprop
from ..ode._inputs import _api, check_args, check_t_eval
from ..ode._odeint_adjoint import odeint_adjoint


def _check_t_span(t_span: object) -> None:
    """A pair of finite, distinct-or-equal times (floats or 0-dim tensors)."""
    if not isinstance(t_span, (tuple, list)) or len(t_span) != 2:
        raise ValueError(f"t_span must be a pair (t0, t1), got {t_span!r}.")
    for name, value in zip(("t0", "t1"), t_span):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"t_span's {name} must be a number or a 1-element tensor.")
            value = float(value.detach())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"t_span's {name} must be a number, got {type(value).__name__}.")
        if not math.isfinite(value):
            raise ValueError(
                f"t_span must be finite, got {name} = {value!r}; pass e.g. t_span=(0.0, 1.0)."
            )


def _grid_rows(t_eval: object) -> int | None:
    """The batch a (batch, n) t_eval is for; None for a shared (n,) one."""
    shape = getattr(t_eval, "shape", None)
    if shape is None:
        shape = torch.as_tensor(t_eval, dtype=torch.float64).shape
    return int(shape[0]) if len(shape) == 2 else None


__all__ = ["NeuralODE"]


class NeuralODE(torch.nn.Module):
    """y(t1) for dy/dt = f_module(t, y), y(t0) = x, with a choice of gradient.

    Arguments:
        f_module: nn.Module called as f_module(t, y) with t of shape (batch, 1, ..., 1)
            (broadcasting against y) and y of shape (batch, ...) (see equilibria.ode).
        t_span: (t0, t1): floats, or tensors that require grad to learn the time span
            (with gradient=Adjoint(); Backprop refuses them rather than drop the gradient).
        solver: solver object (default Dopri5()).
        gradient: Adjoint() (an adjoint backward: continuous, with memory independent of the
            number of steps, for explicit solvers; checkpointed, replaying the forward's
            steps, for implicit solvers and events: see equilibria.ode.Adjoint) or
            Backprop() (autograd through the steps).
        rtol, atol, max_steps: as in odeint.
        t_eval: optional times: (n,) shared by the samples, or (batch, n), each sample its
            own (e.g. irregular observation times); forward then returns (n, batch, ...).
            `forward(..., t_eval=...)` overrides it for one call.
        throw: raise EquilibriaError when a sample fails in the forward solve.
        event: optional `Event(fn, direction, terminal)` (fn may be an nn.Module: its
            parameters are trained too): a terminal event stops each sample at its own event
            time, the output is the state there, and last_solution.stats["event_t"] holds the
            differentiable event times (implicit function theorem; with Adjoint() the
            checkpointed backward starts each sample at its event).

    Call it as ``node(y0)``, ``node(y0, t_eval=times)`` or, conditioned,
    ``node(y0, args=(x,))``: per-sample tensors with
    y0's batch in dim 0, passed as f_module(t, y, *args), sliced with y when finished samples
    are dropped, and differentiated with either gradient (a conditioning that comes from an
    encoder gets its gradient).

    Attributes:
        last_solution: the Solution of the latest forward (status, stats; after backward
            with Adjoint, stats["adjoint_nfe"]).

    Raises:
        TypeError: when f_module is not an nn.Module, or solver/gradient are not the objects
            named above.
        ValueError: at construction: rtol/atol not finite and > 0, t_span not a pair of
            finite times, max_steps < 1, t_eval outside t_span (each naming the fix).

    Reference: Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018.
    """

    def __init__(
        self,
        f_module: torch.nn.Module,
        t_span: tuple[float, float] = (0.0, 1.0),
        solver: RungeKutta = Dopri5(),  # noqa: B008
        gradient: Adjoint | Backprop = Adjoint(),  # noqa: B008
        rtol: float = 1e-6,
        atol: float = 1e-8,
        t_eval: Sequence[float] | torch.Tensor | None = None,
        max_steps: int = 10_000,
        throw: bool = False,
        event: Event | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(f_module, torch.nn.Module):
            raise TypeError(
                f"f_module must be an nn.Module f(t, y), got {type(f_module).__name__}."
            )
        if not isinstance(solver, (RungeKutta, ImplicitRK)):
            raise TypeError(
                f"solver must be a solver object (Dopri5(), ..., or implicit Kvaerno3(), "
                f"Kvaerno5()), got {solver!r}."
            )
        if not isinstance(gradient, (Adjoint, Backprop)):
            raise TypeError(f"gradient must be Adjoint() or Backprop(), got {gradient!r}.")
        if event is not None and not isinstance(event, Event):
            raise TypeError(
                f"event must be an equilibria.ode.Event(fn, direction, terminal), got "
                f"{type(event).__name__}; wrap a function as Event(fn)."
            )
        check_tolerances(atol, rtol)
        check_positive_int("max_steps", max_steps)
        _check_t_span(t_span)
        if t_eval is not None:
            # odeint's own check, run now so a bad grid fails at construction (a per-sample
            # grid's batch is checked against y0's at the call)
            check_t_eval(t_eval, *(float(t) for t in t_span), _grid_rows(t_eval))
        self.f_module = f_module
        self.t_span = t_span
        self.solver = solver
        self.gradient = gradient
        self.rtol = rtol
        self.atol = atol
        self.t_eval = t_eval
        self.max_steps = max_steps
        self.throw = throw
        self.event = event
        # an event function with parameters is part of the model (optimizers, state_dict)
        event_fn = getattr(event, "fn", None)
        self.event_fn = event_fn if isinstance(event_fn, torch.nn.Module) else None
        self.last_solution: Solution | None = None

    def forward(
        self,
        y0: torch.Tensor,
        args: tuple[torch.Tensor, ...] | torch.Tensor = (),
        t_eval: Sequence[float] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y0: (batch, ...) -> y(t1) (batch, ...), or (n, batch, ...) with t_eval.

        args: per-sample conditioning (tensors with y0's batch in dim 0), passed as
        f_module(t, y, *args). t_eval: this call's times, (n,) or (batch, n) (default: the
        constructor's); value[i, b] is sample b at t_eval[i] or t_eval[b, i]. Either
        gradient differentiates the values at per-sample times (Adjoint() through its
        checkpointed backward).

        Raises:
            ValueError: t_eval not a monotone grid inside t_span, or a (rows, n) grid whose
                rows are not y0's batch; as the constructor otherwise."""
        check_batched_state("y0", y0)
        args = check_args(args, y0, "NeuralODE")
        if t_eval is None:
            t_eval = self.t_eval
        else:
            check_t_eval(t_eval, *(float(t) for t in self.t_span), y0.shape[0])
        with _api("NeuralODE"):
            if isinstance(self.gradient, Adjoint):
                sol = odeint_adjoint(self.f_module, y0, self.t_span, solver=self.solver,
                                     rtol=self.rtol, atol=self.atol, t_eval=t_eval,
                                     max_steps=self.max_steps, gradient=self.gradient,
                                     args=args, event=self.event)
            else:
                sol = odeint(self.f_module, y0, self.t_span, solver=self.solver,
                             rtol=self.rtol, atol=self.atol, t_eval=t_eval,
                             max_steps=self.max_steps, args=args, event=self.event)
        self.last_solution = sol
        if self.throw:
            sol.raise_if_failed("NeuralODE")
        return sol.value

    def extra_repr(self) -> str:
        return (f"t_span={self.t_span}, solver={self.solver}, gradient={self.gradient}, "
                f"rtol={self.rtol}, atol={self.atol}")
