"""The research toolkit's costs, measured: structured (tuple) states against the same model
hand-flattened, and parametrizations evaluated once per solve against once per evaluation.

Each row is one training step (forward solve + implicit backward + parameter gradients) of a
two-scale convolutional DEQ; contenders run round robin, medians reported.

    .venv/bin/python benchmarks/toolkit_bench.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import equilibria as eq
import equilibria.nn._parametrize as parametrize_scope


class TwoScaleCell(nn.Module):
    """A fine (C1, S, S) and a coarse (C2, S/2, S/2) map, each updated from both."""

    def __init__(self, c1: int, c2: int, norm: str | None = None) -> None:
        super().__init__()
        self.fine = nn.Conv2d(c1, c1, 3, padding=1)
        self.coarse = nn.Conv2d(c2, c2, 3, padding=1)
        self.down = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.up = nn.Conv2d(c2, c1, 1)
        self.norm_fine = nn.GroupNorm(4, c1)
        self.norm_coarse = nn.GroupNorm(4, c2)
        with torch.no_grad():
            for conv in (self.fine, self.coarse, self.down, self.up):
                conv.weight.mul_(0.5)
        for conv in (self.fine, self.coarse, self.down, self.up):
            if norm is not None:
                getattr(parametrizations, norm)(conv, "weight")

    def forward(self, z, x):
        fine, coarse = z
        up = F.interpolate(self.up(coarse), scale_factor=2, mode="nearest")
        return (self.norm_fine(torch.tanh(self.fine(fine) + up + x)),
                self.norm_coarse(torch.tanh(self.coarse(coarse) + self.down(fine))))


class FlatCell(nn.Module):
    """The same cell on one (batch, n) state, unpacked and repacked by hand in each call."""

    def __init__(self, cell: TwoScaleCell, shapes) -> None:
        super().__init__()
        self.cell = cell
        self.shapes = shapes

    def forward(self, z, x):
        n1 = self.shapes[0][0] * self.shapes[0][1] * self.shapes[0][2]
        fine = z[:, :n1].reshape(-1, *self.shapes[0])
        coarse = z[:, n1:].reshape(-1, *self.shapes[1])
        a, b = self.cell((fine, coarse), x)
        return torch.cat([a.flatten(1), b.flatten(1)], dim=1)


def training_step(deq: eq.DEQ, x: torch.Tensor, split: int | None = None,
                  ) -> tuple[float, float, float]:
    """One forward + backward; `split` is the fine scale's width of a hand-flattened state,
    so that both sides take the same loss (the same right-hand side for the backward)."""
    deq.zero_grad()
    start = time.perf_counter()
    out = deq(x)
    if split is not None:
        out = (out[:, :split], out[:, split:])
    loss = out[0].square().mean() + out[1].square().mean()
    loss.backward()
    elapsed = time.perf_counter() - start
    solution = deq.last_solution
    nfe = (float(solution.stats["nfe"].float().mean()),
           float(deq.last_backward_stats["nfe"].float().mean()))
    return elapsed, nfe, float(solution.success.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    parser.add_argument("--side", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c1, c2 = args.channels
    shapes = ((c1, args.side, args.side), (c2, args.side // 2, args.side // 2))
    x = torch.randn(args.batch, c1, args.side, args.side)
    solver = eq.Anderson()

    cell = TwoScaleCell(c1, c2)
    tuple_deq = eq.DEQ(cell, solver=solver, z_shape=shapes, rtol=1e-4, max_steps=40)
    width = sum(s[0] * s[1] * s[2] for s in shapes)
    fine = shapes[0][0] * shapes[0][1] * shapes[0][2]
    flat_deq = eq.DEQ(FlatCell(cell, shapes), solver=solver, z_shape=(width,), rtol=1e-4,
                      max_steps=40)
    normed = {norm: eq.DEQ(TwoScaleCell(c1, c2, norm=norm), solver=solver, z_shape=shapes,
                           rtol=1e-4, max_steps=40)
              for norm in ("weight_norm", "spectral_norm")}

    def per_evaluation(deq):  # what plain torch parametrize does: the weight at every f call
        with mock.patch.object(parametrize_scope, "has_parametrizations", lambda m: False):
            return training_step(deq, x)

    contenders = {
        "tuple state (equilibria packs it)": lambda: training_step(tuple_deq, x),
        "hand-flattened state": lambda: training_step(flat_deq, x, split=fine),
        "weight_norm, once per solve (DEQ default)":
            lambda: training_step(normed["weight_norm"], x),
        "weight_norm, at every evaluation of f": lambda: per_evaluation(normed["weight_norm"]),
        "spectral_norm, once per solve (DEQ default)":
            lambda: training_step(normed["spectral_norm"], x),
        "spectral_norm, at every evaluation of f":
            lambda: per_evaluation(normed["spectral_norm"]),
    }
    times = {name: [] for name in contenders}
    nfes = {name: [] for name in contenders}
    successes = {name: [] for name in contenders}
    for contender in contenders.values():  # warm-up
        contender()
    for _ in range(args.repeats):
        for name, contender in contenders.items():
            elapsed, nfe, success = contender()
            times[name].append(elapsed)
            nfes[name].append(nfe)
            successes[name].append(success)
    print(f"two-scale conv DEQ, batch {args.batch}, state {shapes}, Anderson, rtol 1e-4, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved rounds; "
          f"load {open('/proc/loadavg').read().split()[:3]}")
    print("| contender | forward / backward NFE | ms / training step | ratio | success share |")
    print("|---|---|---|---|---|")
    for name in contenders:
        median = statistics.median(times[name])
        kind = name.split(",")[0]
        reference = ("hand-flattened state" if "state" in name
                     else f"{kind}, at every evaluation of f")
        ref = statistics.median(times[reference])
        forward = statistics.median(n[0] for n in nfes[name])
        backward = statistics.median(n[1] for n in nfes[name])
        print(f"| {name} | {forward:.1f} / {backward:.1f} | {1e3 * median:.1f} | "
              f"{median / ref:.3f} | {statistics.median(successes[name]):.2f} |")


if __name__ == "__main__":
    main()
