"""Solves leave nothing alive behind them: the solvers cache views of their buffers on the
buffers, and a view keeps its base alive from C++, so a cache holding views of its own
tensor is a reference cycle Python's collector cannot free. Compaction makes fresh buffers
every few steps; a DEQ trained with compact=True leaked ~11 MB a step this way."""

from __future__ import annotations

import gc

import pytest
import torch

import equilibria as eq


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("solver", [eq.Anderson(), eq.Picard(), eq.Anderson(m=3, damping=0.7)])
@pytest.mark.parametrize("compact", [True, False])
def test_repeated_solves_leave_no_tensors_alive(solver, compact):
    torch.manual_seed(0)
    batch, width = 16, 32
    # rows contract at very different rates, so they stop at different steps and compaction
    # drops rows several times a solve
    # (the per-row rate travels in x, which compaction slices with the rows)
    rate = torch.linspace(0.05, 0.9, batch)[:, None]
    w = torch.randn(width, width) / width**0.5
    x = torch.cat([rate, torch.randn(batch, width)], dim=1)

    def f(z, x):
        return x[:, :1] * torch.tanh(z @ w) + x[:, 1:]

    def solve():
        with torch.no_grad():
            result = eq.fixed_point(f, torch.zeros(batch, width), x, solver, atol=1e-6, rtol=1e-6,
                                    max_steps=200, compact=compact)
        assert result.status.eq(int(eq.Status.SUCCESS)).all()
        return result.stats["n_steps"]

    steps = solve()
    assert steps.min() < steps.max()  # the rows did stop at different steps
    before = _live_tensors()
    for _ in range(5):
        solve()
    assert _live_tensors() <= before
