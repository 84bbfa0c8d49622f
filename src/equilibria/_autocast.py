"""Solvers under torch.autocast: the map runs in the caller's low precision, the solver's own
arithmetic (Gram matrices, least squares, Krylov bases, dense output, tolerance tests) in the
state's precision.

Autocast rewrites matmul-like ops to float16 / bfloat16 wherever they run, solver internals
included: a Gram matrix formed by a bfloat16 bmm has 3 significant digits, which stalls
Anderson short of a 1e-3 residual and made backpropagation through its steps NaN. So a solver
entry point (decorated with `outside_autocast`) switches autocast off for its body and calls
the map under the caller's autocast state; an output of the map in the autocast dtype is cast
back to the state's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["autocast_context", "autocast_dtype", "outside_autocast", "under_autocast"]

Solver = TypeVar("Solver", bound=Callable[..., Any])


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type`, or None when autocast is off there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """torch.autocast in `dtype` on the device type, or a null context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def under_autocast(fn: Callable[..., Any], device_type: str, low: torch.dtype,
                   state_dtype: torch.dtype) -> Callable[..., Any]:
    """fn run under autocast in `low`, its output in `low` cast to `state_dtype` (the cast is
    differentiable: gradients flow back through it in the usual way)."""
    cache = torch.is_autocast_cache_enabled()

    def under_autocast(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=low, cache_enabled=cache):
            out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dtype == low and state_dtype != low:
            out = out.to(state_dtype)
        return out

    return under_autocast


def outside_autocast(fn: str, state: str) -> Callable[[Solver], Solver]:
    """Decorate a solver entry point whose argument `fn` is the map and `state` its state
    tensor: under autocast (on the state's device) the body runs with autocast off and `fn`
    runs under the caller's autocast, its low-precision output cast to the state's dtype.
    Without autocast the call goes straight through. Bad arguments reach the solver's own
    checks unchanged."""

    def decorate(solver: Solver) -> Solver:
        signature = inspect.signature(solver)
        state_index = list(signature.parameters).index(state)

        @functools.wraps(solver)
        def entry(*args: Any, **kwargs: Any) -> Any:
            # The common case, autocast off, costs one lookup (no signature binding).
            tensor = args[state_index] if len(args) > state_index else kwargs.get(state)
            if not isinstance(tensor, torch.Tensor):
                return solver(*args, **kwargs)  # the solver reports a bad state
            device_type = tensor.device.type
            low = autocast_dtype(device_type)
            if low is None:
                return solver(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return solver(*args, **kwargs)  # let the solver report the bad call
            map_ = bound.arguments.get(fn)
            if not callable(map_):
                return solver(*args, **kwargs)
            bound.arguments[fn] = under_autocast(map_, device_type, low, tensor.dtype)
            with torch.autocast(device_type, enabled=False):
                return solver(*bound.args, **bound.kwargs)

        return entry  # type: ignore[return-value]

    return decorate
