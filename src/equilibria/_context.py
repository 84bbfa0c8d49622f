"""Per-call context a solver shares with the map it evaluates, without changing f's signature.

- `current_rows()`: which samples of the full batch f is being evaluated on. fixed_point
  evaluates f on a subset of rows when it compacts finished samples away or retries failed
  trials (line searches); per-sample state kept inside f (a variational dropout mask) reads
  the rows to select its own.
- `current_call()`: a token of the DEQ call being computed (None outside one), so state kept
  for "one DEQ call" (the same dropout mask at every iteration and in the backward) knows
  when a new call begins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

__all__ = ["call_scope", "current_call", "current_rows", "rows_scope"]

_ROWS: ContextVar[torch.Tensor | None] = ContextVar("equilibria_rows", default=None)
_CALL: ContextVar[object | None] = ContextVar("equilibria_call", default=None)


def current_rows() -> torch.Tensor | None:
    """The full-batch indices (int64) of the rows f is evaluated on; None means all rows, in
    order."""
    return _ROWS.get()


@contextlib.contextmanager
def rows_scope(rows: torch.Tensor | None) -> Iterator[None]:
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def current_call() -> object | None:
    """The token of the DEQ call being computed, or None outside a DEQ call."""
    return _CALL.get()


@contextlib.contextmanager
def call_scope(token: object | None) -> Iterator[None]:
    """Run the body as part of the DEQ call `token` (e.g. a backward pass that re-evaluates
    f must see the same per-call state as the forward)."""
    previous = _CALL.set(token)
    try:
        yield
    finally:
        _CALL.reset(previous)
