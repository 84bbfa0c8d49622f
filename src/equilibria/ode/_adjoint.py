"""Gradients through odeint: Backprop (autograd through the steps) and the continuous Adjoint.

The adjoint method (Chen et al. 2018; Pontryagin): for L depending on y(t1), the costate
a(t) = dL/dy(t) and the parameter gradient obey, backwards from t1 to t0,

    dy/dt = f(t, y),    da/dt = -a^T df/dy,    da_theta/dt = -a^T df/dtheta,

with a(t1) = dL/dy(t1) and a_theta(t1) = 0; then dL/dy0 = a(t0) and dL/dtheta = a_theta(t0).
The vector-Jacobian products a^T df/dy and a^T df/dtheta come from one autograd call per
evaluation. The forward pass keeps no graph and the backward pass integrates this augmented
system with a fresh odeint, so memory does not grow with the number of steps. With t_eval,
the incoming gradient at each t_eval point is added to a while integrating back (and y is
reset to the forward value there, which limits the drift of the backward reconstruction).

Time-span gradients come without integrating anything more: moving t1 moves the returned
state along the flow, dL/dt1 = a(t1) . f(t1, y(t1)); moving t0 (y0 fixed) shifts the whole
trajectory, dL/dt0 = -a(t0) . f(t0, y0).

The backward system couples the whole batch through a_theta (a sum over samples), so it is
integrated as one system with one shared step size — per-sample step control applies to the
forward pass. By default its step test uses a seminorm over y and a only (Kidger, Chen &
Lyons, "'Hey, that's not an ODE': Faster ODE Adjoints via Seminorms", ICML 2021): nothing
in the system depends on a_theta, so its local error cannot grow through the dynamics and
need not shrink the steps; it is still integrated with the same (accurate) steps.

Reference: Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations",
NeurIPS 2018, Algorithm 1 and Appendix B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._autocast import autocast_context, autocast_dtype
from .._checks import check_positive, check_positive_int, rms_norm
from .._solution import Solution
from ._adjoint_rows import per_sample_trajectory
from ._adjoint_time import time_span_gradient
from ._implicit import ImplicitRK
from ._inputs import _api
from ._integrate import odeint
from ._solvers import RungeKutta, Tsit5

__all__ = ["Adjoint", "AdjointFunction", "AdjointTrajectory", "Backprop", "adjoint_trajectory"]


@dataclass(frozen=True)
class Backprop:
    """Gradients by autograd through every solver step (memory grows with the steps).

    Step sizes are treated as constants (the controller runs under no_grad): the gradient is
    that of the discrete map actually taken, which differs from the exact one by the
    integration error.
    """


@dataclass(frozen=True)
class Adjoint:
    """Gradients by an adjoint backward pass instead of a graph through every step.

    Two backwards, chosen by `checkpoints`:

    - continuous (Chen et al. 2018): y and the costate a are integrated together from t1
      back to t0 with a fresh odeint; O(1) memory in the steps. Integrating y backwards is
      unstable for stiff fields (its decaying modes grow), so this backward fails there.
    - checkpointed (see `_adjoint_checkpoint`): the forward keeps each accepted step's start
      (t, y) per sample (O(steps x state) memory, no graph); the backward replays the steps
      from the last to the first, one step's graph at a time, and pulls a back through each
      (through an implicit step by (I - dt gamma J)^-T). y is never integrated backwards, so
      it works on stiff problems; the gradient is that of the steps taken (as Backprop's),
      each sample's from its own steps, starting where the sample stopped (t1 or its event).

    Arguments:
        checkpoints: True: the checkpointed backward; False: the continuous one; None
            (default): checkpointed when the forward solver is implicit (Kvaerno3/5: a stiff
            problem), when odeint_adjoint has an `event`, or a per-sample (batch, n) t_eval,
            continuous otherwise.
        rtol, atol: tolerances of the continuous backward solve (default: the forward's).
        solver: solver of the continuous backward solve (default: the forward's).
        max_steps: step bound of the continuous backward solve (default: the forward's).
        seminorm: step control of the continuous backward solve on y and a only, not on the
            parameter integrals (fewer steps; Kidger et al. 2021). False: the full norm.
        per_sample: integrate the continuous backward system per sample, each on its own
            steps, so that a sample's gradient does not depend on its batch-mates (see
            `_adjoint_rows`; f must then be an nn.Module when it has parameters; memory
            batch x n_params for the per-sample parameter gradients). False (default): the
            batch as one system with one shared step size. (The checkpointed backward is
            per sample by construction.)

    rtol, atol, solver, max_steps and seminorm configure the continuous backward's solve; the
    checkpointed backward has none (it replays the forward's steps), so giving them with
    checkpoints=True is refused, and with the automatic choice odeint_adjoint refuses them
    when it picks the checkpointed backward.

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range, or continuous-solve
            options with checkpoints=True.
    """

    rtol: float | None = None
    atol: float | None = None
    solver: RungeKutta | None = None
    max_steps: int | None = None
    seminorm: bool = True
    per_sample: bool = False
    checkpoints: bool | None = None

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            if getattr(self, name) is not None:
                check_positive(f"Adjoint.{name}", getattr(self, name))
        if self.solver is not None and not isinstance(self.solver, (RungeKutta, ImplicitRK)):
            raise TypeError(f"Adjoint.solver must be a solver object, got {self.solver!r}.")
        if self.max_steps is not None:
            check_positive_int("Adjoint.max_steps", self.max_steps)
        if not isinstance(self.seminorm, bool):
            raise TypeError(f"Adjoint.seminorm must be a bool, got {self.seminorm!r}.")
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"Adjoint.per_sample must be a bool, got {self.per_sample!r}.")
        if self.checkpoints is not None and not isinstance(self.checkpoints, bool):
            raise TypeError(
                f"Adjoint.checkpoints must be True, False or None (automatic), got "
                f"{self.checkpoints!r}."
            )
        if self.checkpoints is True and self.continuous_options():
            raise ValueError(
                f"Adjoint(checkpoints=True) replays the forward's steps and has no backward "
                f"solve of its own, so {', '.join(self.continuous_options())} would be "
                "ignored: drop them, or use checkpoints=False for the continuous backward."
            )

    def continuous_options(self) -> list[str]:
        """The options given that only the continuous backward's solve uses."""
        given = [name for name in ("rtol", "atol", "solver", "max_steps")
                 if getattr(self, name) is not None]
        return given + ([] if self.seminorm else ["seminorm=False"])


@dataclass
class AdjointTrajectory:
    """Result of `adjoint_trajectory`.

    Attributes:
        y: (len(t_record), batch, ...) the state reconstructed backwards at t_record.
        a: (len(t_record), batch, ...) the costate a(t) = dL/dy(t) (the momentum p(t)).
        a_params: tuple of tensors shaped like the params: dL/dtheta accumulated from t_end
            down to the last recorded time.
        solution: the Solution of the augmented backward solve (status, stats).
    """

    y: torch.Tensor
    a: torch.Tensor
    a_params: tuple[torch.Tensor, ...]
    solution: Solution


def _augmented_field(f, params, y_shape, y_numel, args=()):
    """f_aug(t, s) on the flat augmented state s = [y, a, a_theta], shape (1, total).

    ``params`` are the tensors whose gradients are integrated (the module's parameters, then
    the per-sample ``args`` that require grad, whose integrals are per sample because row b
    of f depends on row b of args only); ``args`` are passed as f(t, y, *args)."""
    batch = y_shape[0]
    time_shape = (batch,) + (1,) * (len(y_shape) - 1)
    n_module = len(params) - sum(a.requires_grad for a in args)

    def f_aug(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        flat = state[0]
        y = flat[:y_numel].reshape(y_shape)
        a = flat[y_numel : 2 * y_numel].reshape(y_shape)
        with torch.enable_grad():
            y_var = y.detach().requires_grad_(True)
            arg_vars = tuple(x.detach().requires_grad_(x.requires_grad) for x in args)
            dydt = f(t.reshape(()).expand(batch).reshape(time_shape), y_var, *arg_vars)
            wrt = (*params[:n_module], *(x for x in arg_vars if x.requires_grad))
            grads = torch.autograd.grad(dydt, (y_var, *wrt), grad_outputs=a, allow_unused=True)
        pieces = [dydt.detach().reshape(-1), -grads[0].reshape(-1)]
        for g, p in zip(grads[1:], params):
            pieces.append(
                torch.zeros(p.numel(), dtype=state.dtype, device=state.device)
                if g is None
                else -g.reshape(-1).to(state.dtype)
            )
        return torch.cat(pieces)[None]

    return f_aug


def _split(state, y_shape, y_numel, params):
    flat = state.reshape(-1)
    y = flat[:y_numel].reshape(y_shape)
    a = flat[y_numel : 2 * y_numel].reshape(y_shape)
    out, offset = [], 2 * y_numel
    for p in params:
        out.append(flat[offset : offset + p.numel()].reshape(p.shape).to(p.dtype))
        offset += p.numel()
    return y, a, tuple(out)


def adjoint_trajectory(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y_end: torch.Tensor,
    a_end: torch.Tensor,
    t_span: tuple[float, float],
    params: Sequence[torch.Tensor] = (),
    t_record: Sequence[float] | torch.Tensor | None = None,
    solver: RungeKutta = Tsit5(),  # noqa: B008
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps: int = 10_000,
    seminorm: bool = False,
    args: Sequence[torch.Tensor] = (),
) -> AdjointTrajectory:
    """Solve the adjoint (costate) system backwards: y, a = dL/dy and a_theta over time.

    Integrates dy/dt = f, da/dt = -a^T df/dy, da_theta/dt = -a^T df/dtheta from
    t_span[0] (= t_end, where y = y_end, a = a_end, a_theta = 0) to t_span[1] (= t_start).
    This is the backward pass of `Adjoint`, exposed for diagnostics: a(t) is the momentum
    conjugate to y in the Hamiltonian H = a . f (see equilibria.mechanics).

    Arguments:
        f: vector field f(t, y), t of shape (batch, 1, ..., 1).
        y_end, a_end: (batch, ...) state and costate at t_span[0].
        t_span: (t_end, t_start); usually t_end > t_start (backwards in time).
        params: tensors f depends on (requires_grad) whose gradients a_theta to accumulate.
        t_record: times in t_span (monotone from t_end to t_start) at which to return y and
            a; default: only t_start.
        solver, rtol, atol, max_steps: as in odeint (one shared step size for the batch).
        seminorm: leave a_theta out of the step test (see the module docstring).
        args: per-sample tensors (batch in dim 0) passed as f(t, y, *args); those that
            require grad get their gradient integrated too, after params' (in a_params).

    Returns:
        AdjointTrajectory(y, a, a_params, solution).

    Raises:
        ValueError: when a_end's shape differs from y_end's, or odeint rejects the input.
    """
    if not isinstance(y_end, torch.Tensor) or not isinstance(a_end, torch.Tensor):
        raise TypeError("y_end and a_end must be tensors of shape (batch, ...).")
    if a_end.shape != y_end.shape:
        raise ValueError(
            f"a_end has shape {tuple(a_end.shape)} but y_end has {tuple(y_end.shape)}; "
            "the costate has the state's shape."
        )
    args = tuple(args)
    params = tuple(params) + tuple(a for a in args if a.requires_grad)
    y_numel = y_end.numel()
    state0 = torch.cat(
        [y_end.detach().reshape(-1), a_end.detach().to(y_end.dtype).reshape(-1)]
        + [torch.zeros(p.numel(), dtype=y_end.dtype, device=y_end.device) for p in params]
    )[None]
    f_aug = _augmented_field(f, params, y_end.shape, y_numel, args)
    t_eval = [t_span[1]] if t_record is None else t_record
    error_norm = None
    if seminorm and params:
        def error_norm(scaled: torch.Tensor) -> torch.Tensor:
            return rms_norm(scaled[:, : 2 * y_numel])

    sol = odeint(f_aug, state0, t_span, solver=solver, rtol=rtol, atol=atol, t_eval=t_eval,
                 max_steps=max_steps, compact=False, error_norm=error_norm)
    ys, as_ = [], []
    for state in sol.value:
        y, a, _ = _split(state, y_end.shape, y_numel, params)
        ys.append(y)
        as_.append(a)
    _, _, a_params = _split(sol.value[-1], y_end.shape, y_numel, params)
    return AdjointTrajectory(torch.stack(ys), torch.stack(as_), a_params, sol)


class AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, y0, t_pair, *inputs):
        # t_pair: (2,) float64 tensor of (t0, t1) when the time span is differentiated, else
        # None; config's t_span holds the same times as floats. inputs: the module's
        # parameters, then the per-sample args.
        f, t_span, t_grid, solver, rtol, atol, max_steps, dt0, gradient, stats_out, n_params = (
            config
        )
        args = inputs[n_params:]
        with torch.no_grad(), _api("odeint_adjoint"):
            sol = odeint(f, y0, t_span, solver=solver, rtol=rtol, atol=atol, t_eval=t_grid,
                         max_steps=max_steps, dt0=dt0, args=args)
        stats_out.update(sol.stats)
        stats_out["status"] = sol.status
        # The backward integrates f again: under the forward's autocast, as torch.utils.
        # checkpoint recomputes (the backward pass itself usually runs outside autocast).
        ctx.autocast = (y0.device.type, autocast_dtype(y0.device.type))
        ctx.config = config
        ctx.t_pair = t_pair is not None
        # y0 is needed again only for dL/dt0 = -a(t0) . f(t0, y0).
        saved_y0 = y0 if ctx.t_pair else y0.new_empty(0)
        ctx.save_for_backward(sol.value, saved_y0, *inputs)
        return sol.value

    @staticmethod
    def _backward(ctx, grad_value):
        f, t_span, t_grid, solver, rtol, atol, max_steps, dt0, gradient, stats_out, n_params = (
            ctx.config
        )
        value, y0, *inputs = ctx.saved_tensors
        params = tuple(inputs[:n_params])
        # the args whose gradient is asked for are integrated after the params
        wants = ctx.needs_input_grad[3 + n_params:]
        args = tuple(a.detach().requires_grad_(w) for a, w in zip(inputs[n_params:], wants))
        b_solver = gradient.solver or solver
        b_rtol = gradient.rtol or rtol
        b_atol = gradient.atol or atol
        b_steps = gradient.max_steps or max_steps
        t0, t1 = (float(t) for t in t_span)
        if t_grid is None:
            times, states, grads = [t1], value[None], grad_value[None]
        else:
            times, states, grads = [float(t) for t in t_grid], value, grad_value
        a = torch.zeros_like(states[-1])
        a_params = [torch.zeros_like(p) for p in params + tuple(x for x in args if x.requires_grad)]
        nfe = 0
        # the backward solve's status (a failed one, e.g. a stiff system integrated backwards,
        # gives no usable gradient): the first failure over the segments, SUCCESS (0) if none
        backward_status = torch.zeros((), dtype=torch.int64)
        # walk the recorded times from the last back to t0, adding each point's gradient
        points = list(range(len(times) - 1, -1, -1))
        for j, i in enumerate(points):
            a = a + grads[i]
            t_from = times[i]
            t_to = times[points[j + 1]] if j + 1 < len(points) else t0
            if t_to == t_from:
                continue
            if gradient.per_sample:
                a, segment_grads, solution = per_sample_trajectory(
                    f, states[i], a, (t_from, t_to), params, args, wants, b_solver, b_rtol,
                    b_atol, b_steps, gradient.seminorm,
                )
                nfe += int(solution.stats["nfe"].max())  # batched evaluations made
            else:
                traj = adjoint_trajectory(f, states[i], a, (t_from, t_to), params, None,
                                          b_solver, b_rtol, b_atol, b_steps, gradient.seminorm,
                                          args)
                a, segment_grads, solution = traj.a[-1], traj.a_params, traj.solution
                nfe += int(solution.stats["nfe"].sum())
            a_params = [acc + g for acc, g in zip(a_params, segment_grads)]
            failed = solution.status[solution.status != 0].cpu()
            if int(backward_status) == 0 and failed.numel():
                backward_status = failed[0]
        grad_t = None
        if ctx.t_pair and ctx.needs_input_grad[2]:
            grad_t, extra_nfe = time_span_gradient(f, value, y0, grad_value, a, t0, t1,
                                                    t_grid is not None, args)
            nfe += extra_nfe
        stats_out["adjoint_nfe"] = nfe
        stats_out["adjoint_status"] = int(backward_status)
        grad_args = iter(a_params[n_params:])
        grad_inputs = [next(grad_args) if w else None for w in wants]
        return (None, a, grad_t, *a_params[:n_params], *grad_inputs)

    @staticmethod
    def backward(ctx, grad_value):
        with autocast_context(*ctx.autocast):
            return AdjointFunction._backward(ctx, grad_value)
