"""Fixed-point correction: a loss on several states along the solver's path.

Bai et al. ("Deep Equilibrium Optical Flow Estimation", CVPR 2022) supervise not only z* but
earlier states z_1, ..., z_{n-1} of the solve, weighting later states more: the solver's path
is pulled towards the answer, which stabilises training and lets inference stop earlier.
Use with ``states = deq(x, n_states=k)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["correction_loss"]


def correction_loss(
    loss_fn: Callable[..., torch.Tensor],
    states: Sequence[Any],
    *args: Any,
    gamma: float = 0.8,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Σ_i w_i · loss_fn(states[i], *args), with w_i = gamma^(n-1-i) by default.

    Arguments:
        loss_fn: maps one state (and ``args``, e.g. the target) to a scalar loss.
        states: the states along the path, z* last (``deq(x, n_states=n)``).
        args: passed to ``loss_fn`` unchanged after the state.
        gamma: decay in (0, 1]: the last state (z*) has weight 1, the one before gamma, ...
        weights: explicit weights, one per state (then ``gamma`` is not used).

    Returns:
        The weighted sum (a scalar tensor).

    Raises:
        ValueError / TypeError: no states, gamma outside (0, 1], weights of the wrong length
            or not finite.

    TorchDEQ's equivalent is ``fp_correction(crit, (states, target), weight_func='exp',
    gamma=0.8)``.
    """
    if not isinstance(states, (list, tuple)) or not states:
        raise ValueError(
            "states must be a non-empty list of states (z* last), e.g. deq(x, n_states=3)."
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable loss_fn(state, *args), got {loss_fn!r}.")
    n = len(states)
    if weights is None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}; e.g. gamma=0.8.")
        weights = [float(gamma) ** (n - 1 - i) for i in range(n)]
    else:
        weights = list(weights)
        if len(weights) != n or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and abs(w) < float("inf")
            for w in weights
        ):
            raise ValueError(
                f"weights must be {n} finite numbers (one per state), got {weights!r}."
            )
    total = weights[-1] * loss_fn(states[-1], *args)
    for weight, state in zip(weights[:-1], states[:-1]):
        total = total + weight * loss_fn(state, *args)
    return total
