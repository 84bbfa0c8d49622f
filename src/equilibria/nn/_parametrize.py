"""torch parametrizations inside a DEQ's f: evaluated once per solve, gradients intact.

`torch.nn.utils.parametrize` recomputes a parametrized weight (weight_norm, spectral_norm,
orthogonal, any user parametrization) at every access, i.e. at every evaluation of f: a
solve of 30 steps normalises the weight 30 times, and spectral_norm's power iteration (in
train mode) changes W between iterations, so the map moves under the solver. Wrapping the
call in `parametrize.cached()` by hand computes the weight once — under the solve's
torch.no_grad — and then reuses that graph-less weight for the backward's graph too: the
parametrization's own parameters (weight_g, weight_v, ...) silently get no gradient.

`solve_scope` does it right: one cache for the whole DEQ call; the entries computed without
grad during the solve are dropped when it ends, and the parametrizations are switched to eval
mode for the rest of the call, so the backward's graph recomputes the weight once, with
grad, without a second power iteration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["SolveScope", "has_parametrizations"]


def has_parametrizations(module: nn.Module) -> bool:
    return any(parametrize.is_parametrized(sub) for sub in module.modules())


def _parametrization_modules(module: nn.Module) -> list[nn.Module]:
    found = []
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for parametrizations in sub.parametrizations.values():
                found.extend(parametrizations.modules())
    return found


class SolveScope:
    """The parametrization cache of one DEQ call (see the module docstring).

    Use ``with scope:`` around the whole call and ``scope.solve(fn)`` around the solve."""

    def __init__(self, module: nn.Module) -> None:
        self.enabled = has_parametrizations(module)
        self._module = module
        self._stack = contextlib.ExitStack()
        self._restore: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> SolveScope:
        if self.enabled:
            self._stack.enter_context(parametrize.cached())
        return self

    def __exit__(self, *exc: Any) -> None:
        for sub, training in self._restore:
            sub.training = training
        self._restore = []
        self._stack.close()

    def solve(self, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return fn()
        cache = getattr(parametrize, "_cache", None)
        before = set(cache) if cache is not None else set()
        result = fn()
        if not torch.is_grad_enabled() and cache is not None:
            # Computed under no_grad: no graph to the parametrization's parameters. Drop
            # them so the backward's graph computes the weight again, with grad.
            for key in set(cache) - before:
                cache.pop(key, None)
        # The parametrizations' train-mode side effects (spectral_norm's power iteration)
        # happened once, in the solve; later evaluations in this call reuse their state.
        for sub in _parametrization_modules(self._module):
            if sub.training:
                self._restore.append((sub, True))
                sub.training = False
        return result
