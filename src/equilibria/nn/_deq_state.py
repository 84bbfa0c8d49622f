"""The DEQ layer's state: declared shapes (one or one per slot of a multi-scale state), the
checks of a given first iterate, the explanation of a forgotten z_shape, and the solver steps
at which fixed-point-correction states are taken."""

from __future__ import annotations

from typing import Any

import torch

from .._structure import Structure, is_structured

__all__ = ["check_state", "check_z_shape", "explain_first_failure", "is_structured_shape",
           "shape_of", "state_steps"]


def is_structured_shape(shape: Any) -> bool:
    return isinstance(shape, (tuple, list)) and bool(shape) and all(
        isinstance(item, (tuple, list)) for item in shape)


def check_z_shape(z_shape: Any) -> Any:
    """A per-sample shape (tuple of positive ints) or one per slot of a structured state."""
    def valid(shape: Any) -> bool:
        return isinstance(shape, (tuple, list)) and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)

    if is_structured_shape(z_shape) and all(valid(shape) for shape in z_shape):
        return tuple(tuple(shape) for shape in z_shape)
    if valid(z_shape):
        return tuple(z_shape)
    raise ValueError(
        f"z_shape must be a tuple of positive ints (the per-sample shape of z, without the "
        f"batch), or a tuple of such tuples for a multi-scale state (e.g. ((8, 16, 16), "
        f"(16, 8, 8))), got {z_shape!r}."
    )


def shape_of(state: Any) -> Any:
    if is_structured(state):
        return tuple(tuple(slot.shape) for slot in state)
    return tuple(state.shape)


def check_state(name: str, state: Any) -> None:
    """A floating tensor, or a tuple/list of them (checked by Structure.of)."""
    if is_structured(state):
        Structure.of(name, state)
        return
    if not isinstance(state, torch.Tensor) or not state.is_floating_point():
        got = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
        raise TypeError(f"{name} must be a floating torch.Tensor or a tuple of them, got {got}.")


def explain_first_failure(f: Any, shape: tuple[int, ...]) -> Any:
    """f, whose first call re-raises a failure with the likely cause: z was shaped like x."""
    called = [False]

    def first_call_explained(z: Any, x: Any) -> Any:
        if called[0]:
            return f(z, x)
        called[0] = True
        try:
            return f(z, x)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise ValueError(
                f"f_module failed on its first call, with z0 shaped like x {shape} (the default "
                "when neither z_shape nor z0 is given). If the state is not shaped like x, pass "
                "z_shape= (per-sample shape; a tuple of shapes for a multi-scale state) or z0=. "
                f"The error from f_module: {type(error).__name__}: {error}"
            ) from error

    return first_call_explained


def state_steps(n_states: int, max_steps: int) -> tuple[int, ...]:
    """The solver steps after which the n_states - 1 earlier states are taken: evenly spaced
    over the step budget (the last state is z* itself)."""
    return tuple(sorted({max(1, round(i * max_steps / n_states)) for i in range(1, n_states)}))
