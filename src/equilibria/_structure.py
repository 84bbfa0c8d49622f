"""Structured (multi-scale) states: a tuple or list of tensors packed into one (batch, n).

A multi-scale DEQ (MDEQ) carries z as several tensors of different shapes, e.g. a
(batch, 8, 16, 16) and a (batch, 16, 8, 8) feature map. Every solver works on one tensor, so
a structured state is packed at the boundary: the slots are flattened per sample and
concatenated along dim 1 (one copy), and unpacked as views of that tensor (no copy). The
tolerance test of a sample is then one RMS over all of its elements in every slot, as the
rules ask, and the solvers' per-step arithmetic is one op per step instead of one per slot.
A hand-flattened model pays the same concatenation in each evaluation of f, so packing costs
what hand-flattening costs.

`Structure.of(name, state)` returns None for a plain tensor (the solvers see it unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Structure", "is_structured"]


def is_structured(state: Any) -> bool:
    """Whether `state` is a tuple or list (of tensors, to be checked by Structure.of)."""
    return isinstance(state, (tuple, list))


class Structure:
    """The layout of a structured state: its container type and each slot's per-sample shape.

    Arguments:
        container: ``tuple`` or ``list``, what f receives and returns.
        shapes: per-sample shape of each slot (without the batch).
        dtype, device: shared by every slot.
    """

    def __init__(self, container: type, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.container = container
        self.shapes = tuple(tuple(shape) for shape in shapes)
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        self.dtype = dtype
        self.device = device
        self.width = sum(self.sizes)

    def __repr__(self) -> str:
        return f"Structure({self.container.__name__}, shapes={self.shapes}, dtype={self.dtype})"

    @classmethod
    def of(cls, name: str, state: Any) -> Structure | None:
        """The structure of `state` (None for a plain tensor); a clear error naming the slot
        when a slot is not a floating tensor with the batch in dim 0, or the slots disagree
        on the batch size, dtype or device."""
        if isinstance(state, torch.Tensor) or not is_structured(state):
            return None
        if len(state) == 0:
            raise ValueError(
                f"{name} is an empty {type(state).__name__}: pass at least one tensor."
            )
        first = None
        for i, slot in enumerate(state):
            where = f"{name}[{i}]"
            if not isinstance(slot, torch.Tensor):
                raise TypeError(
                    f"{where} must be a torch.Tensor (a structured state is a tuple or list of "
                    f"tensors), got {type(slot).__name__}."
                )
            if slot.dim() == 0:
                raise ValueError(
                    f"{where} must have the batch in dim 0: shape (batch, ...), got a 0-dim "
                    f"tensor."
                )
            if not slot.is_floating_point():
                raise TypeError(f"{where} must be a floating tensor, got {slot.dtype}.")
            if first is None:
                first = slot
                continue
            if slot.shape[0] != first.shape[0]:
                raise ValueError(
                    f"{where} has batch {slot.shape[0]} but {name}[0] has {first.shape[0]}: every "
                    "slot of a state holds the same samples in dim 0."
                )
            if slot.dtype != first.dtype:
                raise TypeError(
                    f"{where} has dtype {slot.dtype} but {name}[0] has {first.dtype}: the slots "
                    f"of a state share one dtype; pass {where}.to({first.dtype})."
                )
            if slot.device != first.device:
                raise ValueError(
                    f"{where} is on {slot.device} but {name}[0] on {first.device}: put every "
                    "slot on one device."
                )
        return cls(type(state), [tuple(slot.shape[1:]) for slot in state], first.dtype,
                   first.device)

    def zeros(self, batch: int, dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> Any:
        """A zero state of this structure for `batch` samples."""
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else device
        return self.container(torch.zeros((batch, *shape), dtype=dtype, device=device)
                              for shape in self.shapes)

    def flatten(self, state: Any) -> torch.Tensor:
        """(batch, n): each slot flattened per sample, concatenated along dim 1."""
        batch = state[0].shape[0]
        if len(state) == 1:
            return state[0].reshape(batch, -1)
        return torch.cat([slot.reshape(batch, -1) for slot in state], dim=1)

    def unflatten(self, flat: torch.Tensor) -> Any:
        """The structured state as views of `flat` (batch, n) (no copy; differentiable)."""
        batch = flat.shape[0]
        slots, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            slots.append(flat.narrow(1, start, size).view(batch, *shape))
            start += size
        return self.container(slots)

    def check(self, out: Any, like: Any, what: str = "f") -> Any:
        """Raise a clear error naming the slot when `out` (what `what` returned) does not
        have the structure, shapes, dtype and device of `like`; return `out`."""
        if not isinstance(out, (tuple, list)) or len(out) != len(self.shapes):
            got = (f"{len(out)} tensors" if isinstance(out, (tuple, list))
                   else type(out).__name__)
            raise ValueError(
                f"{what} returned {got} for a state of {len(self.shapes)} tensors; it must "
                f"return the same structure it receives ({len(self.shapes)} tensors, shapes "
                f"{[tuple(slot.shape) for slot in like]})."
            )
        for i, (slot, expected) in enumerate(zip(out, like)):
            if not isinstance(slot, torch.Tensor):
                raise TypeError(
                    f"{what} returned {type(slot).__name__} in slot {i}; return a tensor "
                    f"shaped {tuple(expected.shape)}."
                )
            if slot.shape != expected.shape:
                raise ValueError(
                    f"{what} returned shape {tuple(slot.shape)} in slot {i} for a state slot of "
                    f"shape {tuple(expected.shape)}; return each slot in its state's shape."
                )
            if slot.dtype != expected.dtype:
                raise ValueError(
                    f"{what} returned dtype {slot.dtype} in slot {i} for a state of dtype "
                    f"{expected.dtype}; return the state's dtype."
                )
            if slot.device != expected.device:
                raise ValueError(
                    f"{what} returned slot {i} on {slot.device} for a state on "
                    f"{expected.device}; return the state's device."
                )
        return out

    def wrap(self, f: Callable[..., Any], what: str = "f") -> Callable[..., torch.Tensor]:
        """The map on packed states: z (batch, n) -> flatten(f(unflatten(z), *rest))."""

        def packed(z: torch.Tensor, *rest: Any) -> torch.Tensor:
            state = self.unflatten(z)
            out = self.check(f(state, *rest), state, what)
            return self.flatten(out)

        return packed
