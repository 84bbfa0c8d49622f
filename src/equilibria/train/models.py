"""Build the configured classifier (the config names it; the solver table makes the DEQ)."""

from __future__ import annotations

from torch import nn

from ..models.mdeq import MultiscaleDEQ
from ..models.mnist import ConvMnistDEQ, SeedMnistDEQ
from .config import TrainConfig
from .solvers import make_deq

__all__ = ["build_model"]


def build_model(config: TrainConfig) -> nn.Module:
    """SeedMnistDEQ, ConvMnistDEQ or MultiscaleDEQ with the config's solver, backward and
    tolerances."""
    factory = make_deq(
        config.solver,
        config.backward,
        config.atol,
        config.rtol,
        config.max_steps,
        backward_rtol=config.backward_rtol,
        compact=config.compact,
    )
    if config.model == "seed":
        return SeedMnistDEQ(factory, width=config.width, hidden=config.hidden)
    if config.model == "conv":
        return ConvMnistDEQ(factory, channels=config.channels)
    if config.model == "mdeq":
        channels = tuple(config.channels * 2**scale for scale in range(config.scales))
        return MultiscaleDEQ(factory, channels=channels, dropout=config.dropout)
    raise ValueError(f"unknown model {config.model!r}; choose seed, conv or mdeq.")
