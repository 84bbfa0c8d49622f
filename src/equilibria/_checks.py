"""Input validation and the per-sample norm shared by every solver.

Every check raises ValueError/TypeError naming the argument and the fix, never assert.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "check_batched_state",
    "check_finite",
    "check_positive",
    "check_positive_int",
    "check_tolerances",
    "check_unit_interval",
    "deliberate_sync",
    "out_of_range",
    "rms_norm",
    "row_norm",
]


@contextlib.contextmanager
def deliberate_sync(device: torch.device) -> Iterator[None]:
    """Mark a host read a solver makes on purpose (an input check, the every-k-steps "is
    every sample done?"): on CUDA it is exempt from `torch.cuda.set_sync_debug_mode`, so
    that mode ("warn" or "error") reports only the synchronisations nobody meant."""
    mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def row_norm(flat: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row of a (batch, n) tensor, without overflow or underflow of
    its sum of squares: in float32 the plain sum overflows for elements near 1e19 (a finite
    state read as an infinite norm, and an infinite tolerance passes every residual) and
    underflows to 0 below ~1e-19 (a residual of 1e-30 read as 0: a false SUCCESS). On CPU
    the plain norm is checked on the host (free there) and the rows out of range recomputed
    scaled by their largest element; on other devices, and inside a torch.compile'd region, a
    float32 norm accumulates in float64 (one reduction, no host sync). NaN and inf inputs
    still give NaN / inf."""
    if not flat.is_floating_point():
        return torch.linalg.vector_norm(flat, dim=1)
    if (flat.device.type != "cpu" or torch.compiler.is_compiling()) and (
        flat.dtype != torch.float64
    ):
        return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).to(flat.dtype)
    norm = torch.linalg.vector_norm(flat, dim=1)
    # An all-zero tensor (a zero first iterate, the usual one) has exact zero norms: one
    # `any` instead of the dozen masked ops of the rescaling.
    if norm.numel() and out_of_range(norm) and bool(flat.detach().any()):
        norm = _rescaled(flat, norm)
    return norm


def out_of_range(norm: torch.Tensor) -> bool:
    """Whether a (batch,) norm may have over- or underflowed (one host read). A few CPU
    values (batch <= 64) are read as they are and tested on the host (no aminmax kernel);
    NaN is out of range either way."""
    if norm.device.type == "cpu" and norm.numel() <= _HOST_VALUES:
        small = _SMALL[norm.dtype]
        return any(not small <= value < math.inf for value in norm.detach().tolist())
    low, high = torch.aminmax(norm.detach())
    return not float(high) < math.inf or float(low) < _SMALL[norm.dtype]


# Up to this many values a host read of all of them beats a reduction kernel and its read.
_HOST_VALUES = 64


def _rescaled(flat: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The rows of `norm` out of range recomputed as max|x| · ||x / max|x|||."""
    scale = flat.detach().abs().amax(dim=1)
    bad = ~(norm < math.inf) | (norm < _SMALL[norm.dtype])
    bad = bad & (scale > 0) & (scale < math.inf)  # all-zero rows are 0; inf / NaN rows stay
    safe = torch.where(bad, scale, torch.ones_like(scale))
    wide = torch.linalg.vector_norm(flat / safe[:, None], dim=1) * safe
    return torch.where(bad, wide, norm)


# Below sqrt(tiny) a sum of squares may have lost its elements to underflow.
_SMALL = {dtype: math.sqrt(torch.finfo(dtype).tiny) * 4
          for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS norm: sqrt(mean of x**2 over all dims but the batch). Shape (batch,)."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    # One fused reduction (no squared temporary): half the time of pow(2).mean().sqrt() at
    # (256, 512), and its gradient at x = 0 is 0 rather than NaN.
    return row_norm(flat) * (1.0 / math.sqrt(flat.shape[1]))


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0, else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number > 0, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}; pass e.g. {name}=1e-6.")
    return float(value)


def check_tolerances(atol: Any, rtol: Any) -> tuple[float, float]:
    """Both tolerances finite and > 0."""
    return check_positive("atol", atol), check_positive("rtol", rtol)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """An int >= minimum, else an error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}."
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, in one pass and no temporary: min and max propagate
    NaN and reach +-inf, so both are finite exactly when every element is. (isfinite().all()
    makes four passes and a temporary: ~18x slower at (256, 512) float32 on CPU.)"""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.numel() == 0:
        return True
    values = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    low, high = torch.aminmax(values.detach())
    with deliberate_sync(tensor.device):
        return math.isfinite(float(low)) and math.isfinite(float(high))


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError when `tensor` holds inf or NaN, saying which samples."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if _all_finite(tensor):
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        if tensor.dim() > 0:
            bad = (~finite.reshape(tensor.shape[0], -1).all(dim=1)).nonzero().flatten()
            where = f" (samples {bad[:8].tolist()}{'…' if bad.numel() > 8 else ''})"
        else:
            where = ""
        raise ValueError(f"{name} contains inf or NaN{where}; pass finite values.")


def check_batched_state(name: str, tensor: object) -> torch.Tensor:
    """A finite floating tensor with the batch in dim 0 (the state of every solver)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (batch, ...), got {type(tensor).__name__}."
        )
    if tensor.dim() == 0:
        raise ValueError(
            f"{name} must have the batch in dim 0: shape (batch, ...), got a 0-dim tensor; "
            f"use {name}.reshape(1, 1) for a single sample."
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor, got {tensor.dtype}; use {name}.float()."
        )
    check_finite(name, tensor)
    return tensor


def check_unit_interval(name: str, value: object, closed_top: bool = True) -> float:
    """A number in (0, 1] (or (0, 1) with closed_top=False), else an error naming `name`."""
    interval = "(0, 1]" if closed_top else "(0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in {interval}, got {type(value).__name__}.")
    if not (0.0 < float(value) < 1.0 or (closed_top and float(value) == 1.0)):
        raise ValueError(f"{name} must be in {interval}, got {value!r}; e.g. {name}=0.5.")
    return float(value)
