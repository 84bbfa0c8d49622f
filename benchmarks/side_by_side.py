"""Training and testing loops shared by the side-by-side benchmarks against TorchDEQ.

Each model is given as `forward(images) -> (logits, forward NFE per sample)`, so the libraries
report their own counts and the loops stay the same for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, float]]


def run_epoch(model: torch.nn.Module, forward: Forward, optimizer, images, labels, order,
              batch_size: int) -> tuple[float, float]:
    """One epoch in `order`; returns (seconds, mean forward NFE per sample)."""
    model.train()
    started, nfe, batches = time.perf_counter(), 0.0, 0
    for start in range(0, order.numel(), batch_size):
        index = order[start : start + batch_size]
        logits, batch_nfe = forward(images[index])
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        nfe, batches = nfe + batch_nfe, batches + 1
    return time.perf_counter() - started, nfe / max(batches, 1)


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, forward: Forward, images, labels) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], 500):
        logits, _ = forward(images[start : start + 500])
        correct += int((logits.argmax(1) == labels[start : start + 500]).sum())
    return correct / images.shape[0]
