"""Small DEQ cells shared by the DEQ and backward-strategy tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b), W scaled to spectral norm `contraction` (< 1)."""

    def __init__(self, width: int, in_width: int | None = None, contraction: float = 0.5,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        in_width = width if in_width is None else in_width
        self.W = nn.Linear(width, width, dtype=dtype)
        self.U = nn.Linear(in_width, width, bias=False, dtype=dtype)
        with torch.no_grad():
            self.W.weight.mul_(contraction / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


class GainCell(nn.Module):
    """f(z, (x, gain)) = tanh(gain · W z + U x): per-sample difficulty set by `gain`.

    With W of spectral norm 1, a sample's contraction factor is about its gain, so a gain
    near 1 makes a sample slow to converge while its batch-mates are fast.
    """

    def __init__(self, width: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.W = nn.Linear(width, width, bias=False, dtype=dtype)
        self.U = nn.Linear(width, width, dtype=dtype)
        with torch.no_grad():
            # Symmetric W with spectrum in [-1, 1]: slow modes but no rotation.
            q, _ = torch.linalg.qr(torch.randn(width, width, dtype=dtype))
            spectrum = torch.linspace(-1.0, 1.0, width, dtype=dtype)
            self.W.weight.copy_(q @ torch.diag(spectrum) @ q.T)

    def forward(self, z: torch.Tensor, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, gain = x
        return torch.tanh(gain.unsqueeze(1) * self.W(z) + 0.1 * self.U(inputs))


def saved_bytes(deq: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward during deq(x) (saved_tensors_hooks); then checks
    the graph is usable by running the backward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        z = deq(x)
    z.sum().backward()
    return total


def flat_grad(loss: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, tensors)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: intra-op threads only add contention
    (measured: 6 ms instead of 0.02 ms per 64x16 linear under load). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
