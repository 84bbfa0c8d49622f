"""The MNIST equilibrium models: the seed's MLP DEQ and a convolutional DEQ.

Both are `embed -> DEQ(f) -> head`, where the DEQ returns z* = f(z*, x) with x the embedded
image ("input injection"). The DEQ solves for z* with whatever solver and backward strategy it
is given (see `equilibria.train.solvers`), so the same model runs on the neural-ODE steady
state (the seed's `SteadyState(Tsit5())`) or on a root-finder.

Per-sample semantics: every layer inside f normalises per sample (GroupNorm, never
BatchNorm), so a sample's z* does not depend on its batch-mates.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvCell", "ConvMnistDEQ", "SeedCell", "SeedMnistDEQ"]


class SeedCell(nn.Module):
    """f(z, x) = Linear(500 -> 100)(tanh(Linear(100 -> 500)(z + x))).

    The seed names the cell "Linear(100,500) + tanh + Linear(500,100)" without saying how
    the image enters; as in the seed blog's y = 2x model, the injection x is added to z
    before the first layer (z + x), so at x = 0 the cell is a plain two-layer map of z.

    Shapes: z, x (batch, width) -> (batch, width).
    """

    def __init__(self, width: int = 100, hidden: int = 500) -> None:
        super().__init__()
        self.inner = nn.Linear(width, hidden)
        self.outer = nn.Linear(hidden, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(z + x)))


class _EquilibriumClassifier(nn.Module):
    """inject(images) -> x; z* = DEQ(x); logits = head(z*). Subclasses build the pieces.

    forward(images, z0=None) -> logits (batch, 10). `z0` warm-starts the solve (fixed-point
    reuse); the equilibrium of the last call is kept, detached, in `last_z`.
    """

    deq: nn.Module
    head: nn.Module
    _cell: tuple[nn.Module]  # unregistered reference: the DEQ owns the cell's parameters

    def inject(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inject(images)
        z_star = self.deq(x, z0=torch.zeros_like(x) if z0 is None else z0)
        self.last_z = z_star.detach()
        self._last_pair = (z_star, x)
        return self.head(z_star)

    def jacobian_penalty(self, penalty_fn) -> torch.Tensor:
        """Batch mean of penalty_fn(f, z*, x) (eq.jacobian_penalty, per sample) at the last z*."""
        z_star, x = self._last_pair
        return penalty_fn(self._cell[0], z_star, x).mean()

    @property
    def buffer_shape(self) -> tuple[int, ...]:
        """Per-sample shape of z* as a fixed-point reuse buffer stores it."""
        return tuple(self.deq.z_shape) if self.deq.z_shape is not None else self._z_shape

    @property
    def last_z_packed(self) -> torch.Tensor | None:
        """The last call's z* in the buffer's form (here z* itself)."""
        return self.last_z


class SeedMnistDEQ(_EquilibriumClassifier):
    """flatten -> Linear(784, width) -> DEQ(SeedCell) -> Linear(width, 10).

    Arguments:
        deq_factory: callable(cell) -> a DEQ module (eq.DEQ with the chosen solver,
            backward and tolerances); see `equilibria.train.solvers.make_deq`.
        width, hidden: the seed's 100 and 500.

    forward(images, z0=None) -> logits (batch, 10); images (batch, 1, 28, 28) float.
    `z0` (batch, width) warm-starts the solve (fixed-point reuse); the equilibrium of the
    last call is kept, detached, in `last_z`.
    """

    def __init__(self, deq_factory, width: int = 100, hidden: int = 500) -> None:
        super().__init__()
        self.embed = nn.Linear(28 * 28, width)
        cell = SeedCell(width, hidden)
        self.deq = deq_factory(cell)
        self._cell = (cell,)
        self.head = nn.Linear(width, 10)
        self._z_shape = (width,)
        self.last_z: torch.Tensor | None = None

    def inject(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images.flatten(1))


class ConvCell(nn.Module):
    """f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z))))))), a ResNet-style cell.

    The residual cell of Kolter, Duvenaud & Johnson, "Deep Implicit Layers" (NeurIPS 2020
    tutorial, chapter 4). The convolutions start small (N(0, 0.01)) so the map starts as a
    contraction; GroupNorm keeps z* bounded and acts per sample.

    Shapes: z, x (batch, channels, 14, 14) -> same.
    """

    def __init__(self, channels: int, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(y))))


class ConvMnistDEQ(_EquilibriumClassifier):
    """conv stem to (channels, 14, 14) -> DEQ(ConvCell) -> GN, relu, 2x2 average pool -> linear.

    forward(images, z0=None) -> logits (batch, 10); z0 (batch, channels, 14, 14).
    """

    def __init__(self, deq_factory, channels: int = 32) -> None:
        super().__init__()
        if channels % 8:
            raise ValueError(
                f"channels must be a multiple of 8 (GroupNorm groups), got {channels}."
            )
        self.channels = channels
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 4, stride=2, padding=1, bias=False),
            nn.GroupNorm(8, channels),
        )
        cell = ConvCell(channels)
        self.deq = deq_factory(cell)
        self._cell = (cell,)
        self.head = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(channels * 7 * 7, 10),
        )
        self._z_shape = (channels, 14, 14)
        self.last_z: torch.Tensor | None = None

    def inject(self, images: torch.Tensor) -> torch.Tensor:
        return self.stem(images)
