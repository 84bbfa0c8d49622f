"""The seed's first data set: y = 2x at x = 1, 2, ..., 10."""

from __future__ import annotations

import torch

__all__ = ["linear2x_data"]


def linear2x_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x = 1..10 and y = 2x, each of shape (10, 1) (batch of 10 scalar samples).

    The demo fits a DEQ to these ten points and then asks it for x = -5, outside the range
    it saw: a linear equilibrium extrapolates, so the answer should be -10.
    """
    x = torch.arange(1, 11, dtype=dtype).unsqueeze(1)
    return x, 2 * x
