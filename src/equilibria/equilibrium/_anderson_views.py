"""The views an Anderson step makes of its buffers, made once per solve and few at a time.

At batch 1 a step's arithmetic costs about as much as making its ~20 views (1-4 us each,
mostly Python indexing), so they are kept on the history tensor with the buffers they view
(a new history after compaction, or a new Gram buffer, gets new ones). Making them was still
a third of a batch-1 solve's set-up (~180 indexing calls for 25 steps), so:

- each view is one `as_strided` call (~1 us) on its buffer, with the size, stride and offset
  that the indexing expression gives; that geometry is found once per process (per buffer
  shapes, slot and count) by indexing a storage-less meta tensor of the buffer's geometry,
  so the views are the same as indexed ones, stride for stride;
- views that depend on the slot only (f, g) or on the count only (the valid slots' g, the
  Gram diagonal, the norms, the bordered system) are shared by every (slot, count) pair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._solver import State

__all__ = ["cached_views", "mixing_weights"]

Geometry = tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, storage offset


class RecordViews(NamedTuple):
    """The views of the state's buffers that recording a step into `slot` (with `count`
    valid slots after it) writes and reads."""

    f: torch.Tensor  # the slot's f and g, (batch, n)
    g: torch.Tensor
    g_row: torch.Tensor  # g as (batch, 1, n)
    g_columns: torch.Tensor  # the valid slots' g, (batch, n, count)
    scale: torch.Tensor  # the Gram row's scale, (batch, 1, count)
    kkt_row: torch.Tensor  # the slot's Gram row and column, both (batch, 1, count)
    kkt_column: torch.Tensor
    diagonal: torch.Tensor  # the valid slots' Gram diagonal, (batch, count)
    norms_g: torch.Tensor  # norms[:, :count] and norms[:, m]
    norms_z: torch.Tensor


class MixViews(NamedTuple):
    """The bordered system, right-hand side and history rows of a mixing over `count`
    valid slots, and whether they live on the CPU (where a host read costs nothing)."""

    system: torch.Tensor
    rhs: torch.Tensor
    rows: torch.Tensor
    cpu: bool


# Each view: (buffer name, indexing expression). The expressions are the ones the step used
# to evaluate on the buffers; they now run once per geometry, on meta tensors.
def _slot_recipes(slot: int) -> dict[str, tuple[str, Callable]]:
    return {
        "f": ("history", lambda h: h[:, slot, 0]),
        "g": ("history", lambda h: h[:, slot, 1]),
        "g_row": ("history", lambda h: h[:, slot, 1].unsqueeze(1)),
    }


def _count_recipes(count: int, interleaved: bool) -> dict[str, tuple[str, Callable]]:
    return {
        "g_columns": ("history", lambda h: h[:, :count, 1].transpose(1, 2)),
        "diagonal": ("kkt", lambda k: k.diagonal(dim1=1, dim2=2)[:, 1 : count + 1]),
        "norms_g": ("norms", lambda n: n[:, :count]),
        "system": ("kkt", lambda k: k[:, : count + 1, : count + 1]),
        "rhs": ("rhs", lambda r: r[:, : count + 1]),
        # [alpha_i, (beta - 1) alpha_i] weigh the interleaved [f_i, g_i] rows; with beta = 1
        # the f_i alone.
        "rows": ("history", (lambda h: h[:, :count].reshape(h.shape[0], 2 * count, -1))
                 if interleaved else (lambda h: h[:, :count, 0])),
    }


def _pair_recipes(slot: int, count: int) -> dict[str, tuple[str, Callable]]:
    return {
        "scale": ("row_scale", lambda s: s[:, slot : slot + 1, :count]),
        "kkt_row": ("kkt", lambda k: k[:, slot + 1 : slot + 2, 1 : count + 1]),
        "kkt_column": ("kkt", lambda k: k[:, 1 : count + 1, slot + 1].unsqueeze(1)),
    }


def _geometry_of(tensor: torch.Tensor) -> Geometry:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()


_RECIPES = {"slot": _slot_recipes, "count": _count_recipes, "pair": _pair_recipes}
_BUFFERS = ("history", "kkt", "norms", "rhs", "row_scale")


@functools.lru_cache(maxsize=512)
def _recipe_geometries(kind: str, key: tuple, bases: tuple[Geometry, ...]
                       ) -> tuple[tuple[str, int, Geometry | None], ...]:
    """(name, buffer index, geometry) of each view the recipes `kind` give on buffers of
    geometries `bases` (in `_BUFFERS` order); geometry None when the expression copies (a
    reshape that no view can express)."""
    found = []
    for name, (buffer_name, expression) in _RECIPES[kind](*key).items():
        index = _BUFFERS.index(buffer_name)
        size, stride, offset = bases[index]
        meta = torch.empty(0, device="meta").as_strided(size, stride, offset)
        view = expression(meta)
        found.append((name, index, _geometry_of(view) if view._is_view() else None))
    return tuple(found)


def _make(aliases: tuple[torch.Tensor, ...], bases: tuple[Geometry, ...], kind: str,
          key: tuple) -> dict[str, torch.Tensor]:
    views = {}
    for name, index, geometry in _recipe_geometries(kind, key, bases):
        buffer = aliases[index]
        views[name] = (_RECIPES[kind](*key)[name][1](buffer) if geometry is None
                       else buffer.as_strided(*geometry))
    return views


def cached_views(state: State, key: tuple[str, int, int]
                 ) -> RecordViews | MixViews | tuple[MixViews, RecordViews]:
    """The views one step makes of the state's buffers, made once per (kind, slot, count)
    and kept on the history tensor while it views the same Gram and norms buffers.

    Kinds: "record" (writing `slot` with `count` valid slots after it), "mix" (a mixing
    over `count` slots), "step" (both, for the step that mixes `count` slots and records
    into `slot`: its record sees min(count + 1, m) valid slots)."""
    history, kkt, norms = state["history"], state["kkt"], state["norms"]
    cache = getattr(history, "_equilibria_views", None)
    if cache is None or cache[0] is not kkt or cache[1] is not norms:
        # The views are taken of detached aliases of the buffers, never of `history` itself:
        # a view keeps its base alive from C++, so views of `history` cached in its own
        # __dict__ would form a cycle Python's collector cannot see, and every history made
        # by compaction (a fresh tensor, not a view) would leak with its views.
        cache = (kkt, norms, {"bases": tuple(_geometry_of(state[name]) for name in _BUFFERS),
                              "aliases": tuple(state[name].detach() for name in _BUFFERS)})
        history._equilibria_views = cache  # type: ignore[attr-defined]
    parts = cache[2]
    bases, aliases = parts["bases"], parts["aliases"]
    views = parts.get(key)
    if views is None:
        kind, slot, count = key
        if kind == "step":
            views = parts[key] = (cached_views(state, ("mix", 0, count)), cached_views(
                state, ("record", slot, min(count + 1, history.shape[1]))))
            return views
        interleaved = state["rhs"].shape[2] != 1
        by_count = parts.get(("count", count, interleaved))
        if by_count is None:
            by_count = parts[("count", count, interleaved)] = _make(
                aliases, bases, "count", (count, interleaved))
        if kind == "mix":
            views = MixViews(by_count["system"], by_count["rhs"], by_count["rows"],
                             history.device.type == "cpu")
        else:
            by_slot = parts.get(("slot", slot))
            if by_slot is None:
                by_slot = parts[("slot", slot)] = _make(aliases, bases, "slot", (slot,))
            pair = _make(aliases, bases, "pair", (slot, count))
            norms_z = parts.get("norms_z")
            if norms_z is None:
                norms_z = parts["norms_z"] = aliases[_BUFFERS.index("norms")][:, history.shape[1]]
            views = RecordViews(
                by_slot["f"], by_slot["g"], by_slot["g_row"], by_count["g_columns"],
                pair["scale"], pair["kkt_row"], pair["kkt_column"], by_count["diagonal"],
                by_count["norms_g"], norms_z)
        parts[key] = views
    return views


def mixing_weights(state: State, solution: torch.Tensor, count: int) -> torch.Tensor:
    """``solution[:, 1:].reshape(batch, 1, count * columns)``: the mixing weights (mu
    dropped), as one `as_strided` of the solution when that reshape is a view (its
    geometry kept per count while the solution's strides stay those it was found for)."""
    parts = state["history"]._equilibria_views[2]
    stride = (solution.stride(), solution.storage_offset())
    found = parts.get(("weights", count))
    if found is None or found[0] != stride:
        weights = solution[:, 1:].reshape(solution.shape[0], 1, count * solution.shape[2])
        found = parts[("weights", count)] = (
            stride, _geometry_of(weights) if weights._is_view() else None)
        return weights
    if found[1] is None:
        return solution[:, 1:].reshape(solution.shape[0], 1, count * solution.shape[2])
    return solution.as_strided(*found[1])
