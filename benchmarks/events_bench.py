"""Events: equilibria's odeint(event=Event(...)) side by side with torchdiffeq's odeint_event.

Problem: a ball falling with quadratic air drag, y'' = -g - k v |v|, from heights h in
[2, 20] (one per sample), event: height = 0 (downwards), Dopri5, float64, rtol 1e-8,
atol 1e-10, no autograd. Both libraries locate the event on their dense output.

torchdiffeq's odeint_event stops the whole batch at the first event of any element (one
event time per call), so per-sample event times need one call per sample; equilibria
locates each sample's event in one batched call. Batch 1 and batch 256 (torchdiffeq: a loop
over --peer-samples samples, wall time scaled to 256). Contenders interleaved, median of
--repeats runs after a warm-up. Agreement: max |t_ours - t_peer| over the samples both ran.

Run: .venv/bin/python benchmarks/events_bench.py [--repeats 5] [--peer-samples 32]
Writes benchmarks/results/events.md and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import equilibria as eq

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - reported in the table
    torchdiffeq = None

RESULTS = Path(__file__).parent / "results" / "events.md"
G, DRAG = 9.81, 0.05
RTOL, ATOL = 1e-8, 1e-10


def falling(t, y):
    v = y[..., 1]
    return torch.stack([v, -G - DRAG * v * v.abs()], dim=-1)


def heights(batch: int) -> torch.Tensor:
    h = torch.linspace(2.0, 20.0, 256, dtype=torch.float64)[:batch]
    return torch.stack([h, torch.zeros_like(h)], dim=1)


def ours(y0):
    def go():
        with torch.no_grad():
            sol = eq.odeint(falling, y0, (0.0, 100.0), solver=eq.Dopri5(), rtol=RTOL, atol=ATOL,
                            event=eq.Event(lambda t, y: y[:, 0], direction=-1))
        assert bool((sol.status == eq.Status.EVENT).all())
        return sol.stats["event_t"]
    return go


def peer(y0):
    def go():
        times = []
        with torch.no_grad():
            for row in y0:
                t_event, _ = torchdiffeq.odeint_event(
                    falling, row, torch.tensor(0.0, dtype=torch.float64),
                    event_fn=lambda t, y: y[0], method="dopri5", rtol=RTOL, atol=ATOL)
                times.append(t_event)
        return torch.stack(times)
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    lines = [
        "# Events: equilibria odeint(event=...) vs torchdiffeq odeint_event",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, torchdiffeq "
        f"{getattr(torchdiffeq, '__version__', 'not installed')}, Python "
        f"{platform.python_version()}; torch threads {options.threads}, os.cpu_count() "
        f"{os.cpu_count()}",
        f"- command: `.venv/bin/python benchmarks/events_bench.py {' '.join(sys.argv[1:])}`",
        f"- problem: y'' = -g - {DRAG} v|v| from h in [2, 20], event height = 0, Dopri5, "
        f"float64, rtol {RTOL}, atol {ATOL}, no autograd; wall = median of "
        f"{options.repeats} interleaved runs after a warm-up.",
        "- torchdiffeq stops a batch at its first event: one call per sample; at batch 256 it "
        f"ran {options.peer_samples} samples, wall time scaled to 256.",
        "- caveat: the machine's 2 cores were shared with other jobs; timings are noisy.",
        "",
        "| batch | library | wall ms (median) | ours / torchdiffeq | max abs diff of event times |",
        "|---|---|---|---|---|",
    ]
    if torchdiffeq is None:
        lines.append("| - | torchdiffeq not installed | | | |")
    for batch in (1, 256):
        y0 = heights(batch)
        n_peer = min(batch, options.peer_samples)
        contenders = {"equilibria": ours(y0)}
        if torchdiffeq is not None:
            contenders["torchdiffeq"] = peer(y0[:n_peer])
        results, walls = {}, {key: [] for key in contenders}
        for go in contenders.values():
            go()  # warm-up
        for _ in range(options.repeats):
            for key, go in contenders.items():
                start = time.perf_counter()
                results[key] = go()
                walls[key].append(time.perf_counter() - start)
        wall = {key: statistics.median(value) for key, value in walls.items()}
        if "torchdiffeq" in wall:
            wall["torchdiffeq"] *= batch / n_peer
            diff = float((results["equilibria"][:n_peer] - results["torchdiffeq"]).abs().max())
            ratio = f"{wall['equilibria'] / wall['torchdiffeq']:.2f}"
            scaled = f" (x{batch // n_peer} from {n_peer})" if n_peer != batch else ""
            lines.append(f"| {batch} | equilibria | {wall['equilibria'] * 1e3:.1f} | {ratio} | "
                         f"{diff:.1e} |")
            lines.append(f"| {batch} | torchdiffeq{scaled} | {wall['torchdiffeq'] * 1e3:.1f} | "
                         "| |")
        else:
            lines.append(f"| {batch} | equilibria | {wall['equilibria'] * 1e3:.1f} | | |")
    text = "\n".join(lines) + "\n"
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
