"""What f's memory traffic costs the solver steps around it: the 1 x 2048 point, taken apart.

At batch 1 x width 2048 the sweep's f (`overhead_bench.py`) is a matrix-vector product with a
16 MB weight matrix: every call streams it through the 2 MB level-2 cache and evicts the
interpreter's and libtorch's working set, so the solver's small calls after it run cold. This
script measures that cost per step for every contender, ours and TorchDEQ's, by solving one
problem twice with the same iterates:

- "cheap": f(z) = tanh(d * z + c), d the hard spectrum's eigenvalues (a diagonal map:
  microseconds a call);
- "streaming": the same f plus a discarded (1, 2048) x (2048, 2048) product, so the
  iterates, evaluations and solver calls are identical and only the cache is different.

Per contender and round: step cost beside f = (wall - nfe x f alone) / nfe in both variants
(f timed alone in the same round); their difference is what the stream costs the solver's
own calls per step (its own time already subtracted). Medians over interleaved rounds, one
thread, no_grad. A first section times k tiny calls (x * 2 on a (1, 2048) row) after one
product against the same calls alone.

Run:  .venv/bin/python benchmarks/pollution_bench.py [--rounds 7] [--output FILE]
Writes benchmarks/results/pollution.md and prints it. Needs TorchDEQ (`make .venv/.bench`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import equilibria as eq  # noqa: E402
from overhead_bench import ours, torchdeq  # noqa: E402  (the sweep's contenders)

WIDTH, TOL = 2048, 1e-4
RESULTS = Path(__file__).parent / "results" / "pollution.md"


def median_time(fn: Callable[[], object], n: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny_calls_after_product(rounds: int) -> list[str]:
    """Rows: k tiny calls after one 16 MB product, against k alone (us per call)."""
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(WIDTH, WIDTH, generator=generator)
    v, small = torch.randn(1, WIDTH, generator=generator), torch.randn(1, WIDTH)
    rows = []
    for k in (1, 2, 5, 10, 20):
        extra, alone = [], []
        for _ in range(rounds):
            product = median_time(lambda: torch.mm(v, big), 50)
            with_calls = median_time(
                lambda k=k: (torch.mm(v, big), [small * 2 for _ in range(k)]), 50)
            extra.append((with_calls - product) / k)
            alone.append(median_time(lambda k=k: [small * 2 for _ in range(k)], 50) / k)
        rows.append(f"| {k} | {statistics.median(alone) * 1e6:.1f} | "
                    f"{statistics.median(extra) * 1e6:.1f} |")
    return rows


class Diagonal:
    """f(z) = tanh(d * z + c), optionally with a discarded 16 MB product, counting calls."""

    def __init__(self, c: torch.Tensor, streaming: bool) -> None:
        generator = torch.Generator().manual_seed(1)
        self.d = torch.linspace(-0.99, 0.99, WIDTH)
        self.c, self.calls = c, 0
        self.big = torch.randn(WIDTH, WIDTH, generator=generator) if streaming else None
        self.v = torch.randn(1, WIDTH, generator=generator)

    def __call__(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.big is not None:
            torch.mm(self.v, self.big)
        return torch.tanh(torch.addcmul(self.c if c is None else c, z, self.d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=None, help=f"results file (default {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# What f's memory traffic costs the solver steps around it (1 x 2048)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, CPU, 1 thread; load average at start: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)",
        f"- command: `.venv/bin/python benchmarks/pollution_bench.py --rounds {args.rounds}"
        f"{f' --output {args.output}' if args.output else ''}`",
        "",
        "## Tiny calls after one (1, 2048) x (2048, 2048) product",
        "",
        "| k calls | us a call alone | us a call after the product |",
        "|---|---|---|",
    ]
    lines += tiny_calls_after_product(args.rounds)
    print("\n".join(lines), flush=True)
    c = 0.1 * torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(0))
    contenders = [("ours Anderson", ours(eq.Anderson())), ("ours Broyden", ours(eq.Broyden())),
                  ("ours Picard", ours(eq.Picard())),
                  ("TorchDEQ anderson", torchdeq("anderson")),
                  ("TorchDEQ broyden", torchdeq("broyden"))]
    variants = {"cheap": Diagonal(c, False), "streaming": Diagonal(c, True)}
    per_step: dict[tuple[str, str], list[float]] = {}
    nfe: dict[str, int] = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for variant, f in variants.items():
                t_f = median_time(lambda f=f: f(c), 50)
                for name, run in contenders:
                    f.calls = 0
                    start = time.perf_counter()
                    run(f)
                    wall = time.perf_counter() - start
                    per_step.setdefault((name, variant), []).append(
                        (wall - f.calls * t_f) / f.calls)
                    if nfe.setdefault(f"{name} {variant}", f.calls) != f.calls:
                        raise SystemExit(f"{name}: evaluations differ between rounds")
    lines += [
        "",
        "## Solver cost per step beside f (us): the same iterates, with and without the stream",
        "",
        "| contender | evaluations | cheap f | streaming f | added by the stream |",
        "|---|---|---|---|---|",
    ]
    for name, _ in contenders:
        if nfe[f"{name} cheap"] != nfe[f"{name} streaming"]:
            raise SystemExit(f"{name}: the stream changed the iterates")
        cheap = statistics.median(per_step[(name, "cheap")])
        streaming = statistics.median(per_step[(name, "streaming")])
        lines.append(f"| {name} | {nfe[f'{name} cheap']} | {cheap * 1e6:.0f} | "
                     f"{streaming * 1e6:.0f} | {(streaming - cheap) * 1e6:.0f} |")
    text = "\n".join(lines)
    output = Path(args.output) if args.output else RESULTS
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
