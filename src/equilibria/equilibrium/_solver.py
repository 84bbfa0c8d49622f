"""The interface every fixed-point solver implements, driven by the shared loop in `_loop.py`.

A solver is a small frozen dataclass. It holds no tensors; its per-run data lives in a `state`
dict of tensors whose dim 0 is the batch (so the loop can freeze rows with `torch.where` and
compact them with `index_select` without knowing what the solver stores). Two keys are
mandatory: "z", the current iterate, and "fz", f evaluated at it; the loop computes the
residual f(z) - z from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["FixedPointSolver", "NormLayout", "State", "write_into"]

State = dict[str, torch.Tensor]
Fn = Callable[..., torch.Tensor]


class FixedPointSolver:
    """Base class of fixed-point solvers (Picard, Anderson, Broyden, NewtonKrylov, SteadyState).

    Subclasses implement:

    - `init(fn, z, fz) -> state`: build the state from the first iterate `z` (batch, ...) and
      `fz = fn(z)` (already evaluated by the loop, one evaluation counted).
    - `step(fn, state, step_index) -> (state, nfe)`: one iteration. Returns the new state (with
      the new "z" and "fz" = fn(new z)) and the number of evaluations of `fn` (or JVPs) made,
      an int for every row or a (batch,) int64 tensor.

    `fn(z)` evaluates f on exactly the rows currently in the state (the loop may have compacted
    away converged samples); every tensor in the state must therefore have the batch in dim 0,
    and a row's update must depend on that row only. `fn(z_sub, rows)` evaluates f on the
    subset `rows` (an int64 index into the state's rows) only, e.g. for a line search that
    retries the samples whose trial step failed. `step_index` counts the loop's steps from
    0; it is the same for every row still in the state.

    The loop writes "tolerance" into the state before every step: each row's current
    target atol + rtol ||z|| (RMS), for solvers that size an inner iteration by it.

    A solver may also put "g" = fz - z in the state when it computes it anyway (the loop
    then reuses it for the residual instead of subtracting again), or "residual", the
    (batch,) RMS norm of fz - z, detached (then the loop reads no g at all).

    `stat_keys` names (batch,) state entries the loop copies into `Solution.stats` (e.g. "t",
    the ODE time reached by SteadyState).

    The loop's fused test: a solver may instead keep "norms", a (batch, k) tensor of plain
    Euclidean norms (detached) holding at least ||f(z) - z|| and ||z||, and say in
    `norm_layout(step_index)` which column is which. On CPU the loop then decides "no sample
    stops this step, every one improved" with one matrix product and one reduction over
    them (see `_fused.FusedTest`), and a solver that also keeps the previous step's residual
    norm saves the loop a copy of the best residual per step. `uses_tolerance = False` tells
    the loop not to write "tolerance" (a solver without an inner iteration ignores it).
    """

    stat_keys: tuple[str, ...] = ()
    uses_tolerance: bool = True
    # For `Captured`: a solver whose step depends on step_index only through
    # step_index % period once step_index >= warmup (0: it cannot be captured).
    period: int = 0
    warmup: int = 0

    def norm_layout(self, step_index: int) -> NormLayout | None:
        """Where the norms the loop tests are in state["norms"] after step `step_index`
        (None: the solver keeps none, the loop computes them)."""
        return None

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int | torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class NormLayout:
    """Columns of a solver's state["norms"] (plain 2-norms, one row per sample).

    residual: the column c with norms[:, c] * residual_scale = ||f(z) - z|| at the new z.
    z: the column holding ||z||.
    previous: the column holding the previous step's residual norm (same scale), or None.
    """

    residual: int
    z: int
    previous: int | None = None
    residual_scale: float = 1.0


def write_into(out: torch.Tensor, op: Callable[..., torch.Tensor], *args: torch.Tensor
               ) -> torch.Tensor:
    """op(*args, out=out): the result written into a (possibly strided) view of a buffer
    allocated once. While torch.compile traces (`Captured`), which refuses a strided out=,
    the same write as out.copy_(op(*args)): the compiled kernel stores in place either way."""
    if torch.compiler.is_compiling():
        return out.copy_(op(*args))
    return op(*args, out=out)


def mutable(*tensors: torch.Tensor) -> bool:
    """True when solver memory may be updated in place (autograd records none of it)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product of two (batch, ...) tensors: shape (batch,)."""
    return (a.reshape(a.shape[0], -1) * b.reshape(b.shape[0], -1)).sum(dim=1)


def expand_as_batch(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (batch,) tensor as (batch, 1, 1, ...) to broadcast against `like`."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
