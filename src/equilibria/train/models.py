"""Build the configured MNIST model (the config names it; the solver table makes the DEQ)."""

from __future__ import annotations

from torch import nn

from ..models.mnist import ConvMnistDEQ, SeedMnistDEQ
from .config import TrainConfig
from .solvers import make_deq

__all__ = ["build_model"]


def build_model(config: TrainConfig) -> nn.Module:
    """SeedMnistDEQ or ConvMnistDEQ with the config's solver, backward and tolerances."""
    factory = make_deq(
        config.solver,
        config.backward,
        config.atol,
        config.rtol,
        config.max_steps,
        backward_rtol=config.backward_rtol,
    )
    if config.model == "seed":
        return SeedMnistDEQ(factory, width=config.width, hidden=config.hidden)
    if config.model == "conv":
        return ConvMnistDEQ(factory, channels=config.channels)
    raise ValueError(f"unknown model {config.model!r}; choose seed or conv.")
