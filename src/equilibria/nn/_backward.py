"""How a DEQ's output gets its gradient: Implicit, Unrolled, OneStep, Phantom.

Each strategy is a small frozen dataclass that `DEQ` hands the forward solve to. The common
shape: solve z* = f(z*, x) (with or without a graph), then return a tensor z that equals the
fixed point in value (up to one f step) and whose backward pass is the strategy's gradient.

With L the loss and g = dL/dz*, the implicit function theorem gives the exact gradient

    dL/dθ = u ∂f/∂θ (z*, x),   where u solves   u = u ∂f/∂z (z*, x) + g,

a linear fixed point ("the steady-state adjoint"). The strategies differ in how they get u:
Implicit solves that system, Unrolled backpropagates through the solver's iterations,
OneStep takes u = g (Jacobian-free backprop), Phantom takes k damped steps of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import check_positive_int, check_tolerances, check_unit_interval, rms_norm
from .._solution import Solution, Status
from ..equilibrium._loop import fixed_point
from ..equilibrium._solver import FixedPointSolver
from ..linear._gmres import GMRES

__all__ = ["Backward", "Implicit", "OneStep", "Phantom", "Unrolled"]

# What the caller (DEQ) gives a strategy: the map f(z, x) -> z, the forward solver call
# (z0 -> Solution, honouring the DEQ's solver and tolerances), and a sink for backward stats.
Fn = Callable[[torch.Tensor, Any], torch.Tensor]
Solve = Callable[[torch.Tensor], Solution]
Record = Callable[[dict[str, Any]], None]


def check_f_output(out: Any, z: torch.Tensor) -> torch.Tensor:
    """f must return a tensor of z's shape and dtype."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f_module(z, x) must return a torch.Tensor, got {type(out).__name__}.")
    if out.shape != z.shape or out.dtype != z.dtype:
        raise ValueError(
            f"f_module(z, x) returned shape {tuple(out.shape)} / {out.dtype} for z of shape "
            f"{tuple(z.shape)} / {z.dtype}; a DEQ cell must map the state to a state of the "
            "same shape and dtype (pass z_shape= or z0= if the state differs from x)."
        )
    return out


class _Passthrough(torch.autograd.Function):
    """Identity whose backward records the strategy's backward stats (for logging)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, on_backward: Callable[[], None]) -> torch.Tensor:
        ctx.on_backward = on_backward
        return z.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.on_backward()
        return grad, None


class _ImplicitGradient(torch.autograd.Function):
    """Identity on z_out = f(z*, x) whose backward replaces g by the adjoint u.

    The graph of z_out = f(z_leaf, x) (one f application at the fixed point) is the only
    thing kept: the backward solves u = u ∂f/∂z + g with VJPs through that graph, then lets
    autograd carry u through the same graph to θ and x (u ∂f/∂θ, u ∂f/∂x).
    """

    @staticmethod
    def forward(
        ctx: Any,
        z_out: torch.Tensor,
        z_leaf: torch.Tensor,
        solve_adjoint: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        # Kept as attributes, not save_for_backward: z_out must keep its grad_fn to be
        # differentiated again, and neither tensor refers back to this node (no cycle).
        ctx.z_out = z_out
        ctx.z_leaf = z_leaf
        ctx.solve_adjoint = solve_adjoint
        return z_out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if torch.is_grad_enabled():
            # create_graph=True: the result would treat u as a constant, silently dropping
            # terms of the second derivative. Refuse instead.
            raise RuntimeError(
                "DEQ with Implicit() does not support double backward (create_graph=True): "
                "the adjoint u comes from an iterative solve. Use backward=Unrolled() for "
                "higher-order gradients."
            )
        with torch.no_grad():
            u = ctx.solve_adjoint(ctx.z_out, ctx.z_leaf, grad)
        return u, None, None


@dataclass(frozen=True)
class Implicit:
    """Implicit differentiation: solve u = u ∂f/∂z + g at z*, then one VJP through f.

    Memory is O(1) in the number of forward steps: the forward solve runs without a graph and
    only one application of f at z* is recorded. The backward uses vector–Jacobian products
    only (u ↦ u ∂f/∂z, one VJP each).

    Arguments:
        linear_solver: how to solve the linear system, per sample:
            - a Krylov solver with `.solve(matvec, b, x0)` (default `GMRES()`): applied to
              (I − ∂f/∂zᵀ) u = g. Its own tolerances and iteration bound apply (set them on it,
              e.g. `GMRES(rtol=1e-8)`); `atol`/`rtol`/`max_steps` here must then stay None.
            - a fixed-point solver (`Picard()`, `Anderson()`, …): iterates u ← u ∂f/∂z + g with
              `fixed_point`, under `atol`/`rtol`/`max_steps` (defaults 1e-6, 1e-6, 100).
        atol, rtol, max_steps: the fixed-point solve's per-sample tolerance and step bound.

    Every tolerance of the adjoint solve is relative to its right-hand side g = dL/dz*: the
    system is solved for g / rms(g) per sample and the answer scaled back, so a loss scaled
    by 1e-8 or 1e8 gets the same relative gradient accuracy (GMRES's atol and the fixed-point
    atol act on the normalised system). The stats' "residual" is relative to rms(g) too.

    Why GMRES by default: it needs only that I − ∂f/∂z be invertible, whereas iterating
    u ← u ∂f/∂z + g (Picard, Anderson's base step) needs the spectral radius of ∂f/∂z below 1
    — and the ODE path (SteadyState) also finds equilibria where it is not (eigenvalues of
    real part < 1 but modulus > 1); there the fixed-point adjoint ends DIVERGED. On
    contractive problems Anderson is as accurate per VJP and has less overhead per step
    (benchmarks/results/backward.md).

    Backward stats (`deq.last_backward_stats`): status, residual, n_steps and nfe per sample,
    nfe counting the VJPs of the linear solve plus the final one through f.
    A sample whose linear solve fails does not crash training: its best iterate is used, the
    stats say so and a RuntimeWarning is issued (an EquilibriaError with `DEQ(throw=True)`).

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, §3.3.
    """

    linear_solver: Any = field(default_factory=GMRES)
    atol: float | None = None
    rtol: float | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        solver = self.linear_solver
        krylov = callable(getattr(solver, "solve", None))
        if not krylov and not isinstance(solver, FixedPointSolver):
            raise TypeError(
                f"Implicit(linear_solver=...) must be a linear solver such as eq.GMRES() or a "
                f"fixed-point solver such as eq.Picard() / eq.Anderson(), got "
                f"{type(solver).__name__} {solver!r}."
            )
        given = [name for name in ("atol", "rtol", "max_steps") if getattr(self, name) is not None]
        if krylov and given:
            raise ValueError(
                f"Implicit({', '.join(given)}=...) applies to fixed-point linear solvers only; "
                f"{type(solver).__name__} has its own: set them on it, e.g. "
                f"Implicit(linear_solver={type(solver).__name__}(rtol=1e-8))."
            )
        if not krylov:
            check_tolerances(*self._tolerances())
            if self.max_steps is not None:
                check_positive_int("max_steps", self.max_steps)

    def _tolerances(self) -> tuple[float, float]:
        atol = 1e-6 if self.atol is None else self.atol
        rtol = 1e-6 if self.rtol is None else self.rtol
        return atol, rtol

    def attach(
        self, f: Fn, z0: torch.Tensor, x: Any, solve: Solve, record: Record
    ) -> tuple[torch.Tensor, Solution]:
        with torch.no_grad():
            solution = solve(z0.detach())
        z_leaf = solution.value.detach().requires_grad_(True)
        z_out = check_f_output(f(z_leaf, x), z_leaf)
        if not z_out.requires_grad:  # nothing upstream wants a gradient
            return z_out, solution

        def solve_adjoint(z_out: torch.Tensor, z_leaf: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
            u, stats = self.solve_adjoint(z_out, z_leaf, grad)
            record(stats)  # the DEQ warns (once) or raises (throw=True) on failed samples
            return u

        return _ImplicitGradient.apply(z_out, z_leaf, solve_adjoint), solution

    def solve_adjoint(self, z_out: torch.Tensor, z_leaf: torch.Tensor,
                      grad: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Solve u = u ∂f/∂z + grad per sample; return u and the stats dict.

        Samples whose incoming gradient is not finite (a NaN loss) are not solved: their u
        is the incoming gradient itself and their status NONFINITE.
        """

        def vjp(u: torch.Tensor) -> torch.Tensor:
            # Differentiable in u when a solver records it (NewtonKrylov's JVPs of the
            # adjoint map): then its Newton step is exact on this linear problem.
            (out,) = torch.autograd.grad(z_out, z_leaf, u, retain_graph=True, allow_unused=True,
                                         create_graph=torch.is_grad_enabled())
            return torch.zeros_like(u) if out is None else out

        grad = grad.detach()
        if grad.shape[0] == 0:  # an empty batch: nothing to solve
            empty = torch.zeros(0, dtype=torch.int64, device=grad.device)
            return torch.zeros_like(grad), {
                "strategy": "Implicit", "status": empty, "residual": grad.new_zeros(0),
                "n_steps": empty, "nfe": empty}
        finite = torch.isfinite(grad.reshape(grad.shape[0], -1)).all(dim=1)
        all_finite = bool(finite.all())
        rhs = grad if all_finite else torch.where(_per_row(finite, grad), grad, 0.0)
        # The system is linear: solve it for g / rms(g) per sample and scale back, so that
        # every tolerance of the solve is relative to its right-hand side. (An absolute
        # tolerance is met by the first guess when the loss is small, e.g. 1e-8 · L: zero
        # iterations, SUCCESS, and a parameter gradient 40% off.)
        scale = rms_norm(rhs)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        rhs = rhs / _per_row(scale, rhs)
        if callable(getattr(self.linear_solver, "solve", None)):
            solution = self.linear_solver.solve(lambda u: u - vjp(u), rhs, x0=rhs)
        else:
            batch = rhs.shape[0]

            def adjoint_map(u: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor]):
                # The solver may evaluate a subset of rows (compaction, line searches): the
                # VJP graph covers the whole batch, so embed the rows, take the full VJP
                # (it acts row by row: zero rows stay zero) and read the rows back.
                rhs_rows, rows = data
                if rows.shape[0] == batch:
                    return vjp(u) + rhs_rows
                full = u.new_zeros((batch, *u.shape[1:])).index_copy(0, rows, u)
                return vjp(full).index_select(0, rows) + rhs_rows

            atol, rtol = self._tolerances()
            rows = torch.arange(batch, device=rhs.device)
            solution = fixed_point(
                adjoint_map, rhs, (rhs, rows), solver=self.linear_solver,
                atol=atol, rtol=rtol, max_steps=100 if self.max_steps is None else self.max_steps,
            )
        u, status = solution.value * _per_row(scale, rhs), solution.status
        if not all_finite:
            u = torch.where(_per_row(finite, grad), u, grad)
            status = torch.where(finite, status, int(Status.NONFINITE))
        # fixed_point reports nfe/n_steps, GMRES nmatvec/n_iters: one vocabulary for the logs.
        found = solution.stats
        stats = {
            "strategy": "Implicit",
            "status": status,
            "residual": found["residual"],
            "n_steps": found["n_steps"] if "n_steps" in found else found["n_iters"],
            # + 1: the final VJP through f that carries u to θ and x.
            "nfe": (found["nfe"] if "nfe" in found else found["nmatvec"]) + 1,
        }
        return u, stats


@dataclass(frozen=True)
class Unrolled:
    """Backpropagate through every step of the forward solver (the reference and baseline).

    Exact for the iterates actually computed, but stores the graph of every forward step:
    memory grows linearly with the number of steps. The solver must be differentiable (all of
    `fixed_point`'s are). Backward stats: nfe = the forward nfe (each evaluation is
    backpropagated once), status SUCCESS.
    """

    def attach(
        self, f: Fn, z0: torch.Tensor, x: Any, solve: Solve, record: Record
    ) -> tuple[torch.Tensor, Solution]:
        with torch.enable_grad():
            solution = solve(z0)
        z = solution.value
        if not z.requires_grad:
            return z, solution
        stats = _fixed_cost_stats("Unrolled", solution.stats["nfe"], solution.status)
        return _Passthrough.apply(z, lambda: record(stats)), solution


@dataclass(frozen=True)
class OneStep:
    """Jacobian-free backprop: the gradient of f(z*, x) with z* held constant.

    Equivalent to taking u = g in the implicit formula (dropping the Neumann terms of
    (I − ∂f/∂z)⁻¹), so the backward costs one VJP through f. Not the true gradient, but a
    descent direction when f is contractive enough (Fung et al., "JFB: Jacobian-Free
    Backpropagation for Implicit Networks", AAAI 2022, Thm. 3.1).
    """

    def attach(
        self, f: Fn, z0: torch.Tensor, x: Any, solve: Solve, record: Record
    ) -> tuple[torch.Tensor, Solution]:
        with torch.no_grad():
            solution = solve(z0.detach())
        z_star = solution.value.detach()
        z = check_f_output(f(z_star, x), z_star)
        if not z.requires_grad:
            return z, solution
        stats = _fixed_cost_stats("OneStep", 1, solution.status)
        return _Passthrough.apply(z, lambda: record(stats)), solution


@dataclass(frozen=True)
class Phantom:
    """Phantom gradient: k damped unrolled steps z ← (1 − λ) z + λ f(z, x) from z*.

    Backpropagating through the k steps approximates the implicit gradient by a truncated,
    damped Neumann series; k = 1, λ = 1 is OneStep. Memory O(k), backward nfe k.

    Arguments:
        k: number of unrolled steps (>= 1).
        damping: λ in (0, 1].

    Reference: Geng et al., "On Training Implicit Models", NeurIPS 2021.
    """

    k: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        check_positive_int("k", self.k)
        check_unit_interval("damping", self.damping)

    def attach(
        self, f: Fn, z0: torch.Tensor, x: Any, solve: Solve, record: Record
    ) -> tuple[torch.Tensor, Solution]:
        with torch.no_grad():
            solution = solve(z0.detach())
        z = solution.value.detach()
        for _ in range(self.k):
            z = (1.0 - self.damping) * z + self.damping * check_f_output(f(z, x), z)
        if not z.requires_grad:
            return z, solution
        stats = _fixed_cost_stats("Phantom", self.k, solution.status)
        return _Passthrough.apply(z, lambda: record(stats)), solution


def _fixed_cost_stats(name: str, nfe: int | torch.Tensor, status: torch.Tensor) -> dict[str, Any]:
    """Backward stats of the strategies that solve nothing: every sample SUCCESS."""
    batch = status.shape[0]
    if isinstance(nfe, torch.Tensor):
        nfe_tensor = nfe.detach().clone()
    else:
        nfe_tensor = torch.full((batch,), nfe, dtype=torch.int64, device=status.device)
    return {"strategy": name, "status": torch.zeros_like(status), "nfe": nfe_tensor}


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 1)))


Backward = Implicit | Unrolled | OneStep | Phantom
BACKWARD_TYPES = (Implicit, Unrolled, OneStep, Phantom)
