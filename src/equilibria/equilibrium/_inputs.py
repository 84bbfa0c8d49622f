"""What `fixed_point` checks before it calls f, and the map it hands the solvers.

Bad input gets an error naming the argument and the fix (see DESIGN: never a raw error from
deep in torch); `_bind` makes the map a solver calls, checking every output's metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._checks import (
    check_finite,
    check_positive,
    check_positive_int,
    check_tolerances,
)
from .._context import _ROWS
from ._captured import Captured
from ._solver import FixedPointSolver

__all__ = ["check_options"]


def _solver_choices() -> str:
    return "eq.Picard(), eq.Anderson(), eq.Broyden(), eq.NewtonKrylov(), eq.SteadyState()"


def check_options(z0: torch.Tensor, solver: Any, atol: Any, rtol: Any, max_steps: Any,
                  throw: Any, compact: Any, trace: Any, divergence_factor: Any,
                  keep_steps: Any
                  ) -> tuple[FixedPointSolver, Captured | None, float, float, int, float,
                             tuple[int, ...]]:
    """The keyword arguments of `fixed_point`, checked: returns (solver, capture or None,
    atol, rtol, max_steps, divergence_factor, keep_steps)."""
    if not isinstance(solver, FixedPointSolver):
        raise TypeError(
            f"solver must be a solver object, got {type(solver).__name__} {solver!r}; "
            f"choose one of {_solver_choices()}."
        )
    capture = None
    if isinstance(solver, Captured):
        capture, solver = solver, solver.solver
        for name, value in (("trace", trace), ("keep_steps", keep_steps), ("compact", compact)):
            if value:
                raise ValueError(
                    f"{name} is not available with a Captured solver (its regions keep fixed "
                    f"shapes and record nothing per step); pass {capture.solver!r} instead."
                )
    atol, rtol = check_tolerances(atol, rtol)
    max_steps = check_positive_int("max_steps", max_steps)
    divergence_factor = check_positive("divergence_factor", divergence_factor)
    if divergence_factor <= 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor}; e.g. 1e3.")
    for name, flag in (("throw", throw), ("compact", compact), ("trace", trace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}.")
    if z0.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"z0 has dtype {z0.dtype}: the solvers keep their own arithmetic (norms, Gram "
            "matrices, least squares) in the state's dtype, which half precision cannot carry; "
            "pass z0.float() and run f in low precision under torch.autocast."
        )
    return (solver, capture, atol, rtol, max_steps, divergence_factor,
            _check_keep_steps(keep_steps, max_steps))


def _check_x(x: Any, batch: int) -> tuple[torch.Tensor, ...] | torch.Tensor | None:
    if x is None:
        return None
    items = [("x", x)] if isinstance(x, torch.Tensor) else None
    if items is None:
        if not isinstance(x, (tuple, list)):
            raise TypeError(
                f"x must be a tensor, a tuple of tensors or None, got {type(x).__name__}."
            )
        items = [(f"x[{i}]", item) for i, item in enumerate(x)]
    for name, item in items:
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(item).__name__}.")
        if item.dim() == 0 or item.shape[0] != batch:
            got = "a scalar" if item.dim() == 0 else f"batch {item.shape[0]}"
            raise ValueError(
                f"{name} must have the batch in dim 0 like z0 (batch {batch}), got {got}; "
                "pass one row per sample (use expand for shared inputs)."
            )
        if item.is_floating_point() or item.is_complex():
            check_finite(name, item)
    return x if isinstance(x, torch.Tensor) else tuple(x)


def _select_rows(x: Any, rows: torch.Tensor | None) -> Any:
    if x is None or rows is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.index_select(0, rows)
    return tuple(item.index_select(0, rows) for item in x)


def _bind(f: Callable, x: Any, base: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """fn(z, rows=None): f on the state's rows, or on the subset `rows` of them.

    `base` is the full-batch index of each state row (None: all rows, in order); f can read
    the full-batch rows of every call from `equilibria._context.current_rows()`.

    Every call's output is checked against z (type, shape, dtype, device: metadata only, no
    sync), so an f that changes what it returns mid-solve gets the same clear error as on
    its first call instead of a wrong-dtype result or a raw error from inside a solver."""

    def fn(z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            token = _ROWS.set(base)
            try:
                out = f(z) if x is None else f(z, x)
            finally:
                _ROWS.reset(token)
            if (
                out.__class__ is not torch.Tensor and not isinstance(out, torch.Tensor)
                or out.shape != z.shape
                or out.dtype != z.dtype
                or out.device != z.device
            ):
                _bad_output(out, z)
            return out
        full = rows if base is None else base.index_select(0, rows)
        token = _ROWS.set(full)
        try:
            out = f(z) if x is None else f(z, _select_rows(x, rows))
        finally:
            _ROWS.reset(token)
        if (
            not isinstance(out, torch.Tensor)
            or out.shape != z.shape
            or out.dtype != z.dtype
            or out.device != z.device
        ):
            _bad_output(out, z)
        return out

    return fn


def _bad_output(out: Any, z: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}.")
    if out.shape != z.shape:
        raise ValueError(
            f"f returned shape {tuple(out.shape)} for z of shape {tuple(z.shape)}; a "
            "fixed-point map must return z's shape."
        )
    if out.dtype != z.dtype:
        raise ValueError(
            f"f returned dtype {out.dtype} for z of dtype {z.dtype}; return z's dtype (or "
            "pass z0 in the dtype f computes in)."
        )
    raise ValueError(
        f"f returned a tensor on {out.device} for z on {z.device}; return z's device (move "
        "f's parameters, or z0 and x, to one device)."
    )


def _check_keep_steps(keep_steps: Any, max_steps: int) -> tuple[int, ...]:
    if not isinstance(keep_steps, (tuple, list)) or any(
        isinstance(s, bool) or not isinstance(s, int) for s in keep_steps
    ):
        raise TypeError(f"keep_steps must be a tuple of ints, got {keep_steps!r}.")
    steps = tuple(keep_steps)
    if list(steps) != sorted(set(steps)) or any(not 1 <= s <= max_steps for s in steps):
        raise ValueError(
            f"keep_steps must be increasing step counts in [1, max_steps={max_steps}], got "
            f"{steps!r}."
        )
    return steps
