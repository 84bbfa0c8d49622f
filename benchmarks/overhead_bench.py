"""The solvers' fixed cost per step: a sweep over batch and width, against TorchDEQ 0.1.0.

f(z, x) = tanh(W z + U x + b) on the equilibrium benchmark's hard spectrum (symmetric W with
eigenvalues linspace(-0.99, 0.99), x scaled by 0.1), float32, CPU, no_grad; stop at relative
residual ||f(z) - z|| / ||z|| <= 1e-4 per sample (ours: atol=1e-30, rtol=1e-4; TorchDEQ:
stop_mode="rel" on the batch max). At every point (batch x width) the contenders run round
robin, `--repeats` rounds, each round with its own timing of f; the table gives medians
(on a GPU, `--device cuda`, every timing is bracketed by synchronisations):

- overhead = wall / (evaluations x one f evaluation): 1 means the solver costs nothing
  beside f; evaluations = batched calls of f (ours: the max over samples of nfe);
- ours / TorchDEQ = our best solver's wall time over TorchDEQ's best at that point.

It also counts, with torch.profiler, the aten calls one solver step launches beside f on
CPU (views, allocations and host reads excluded; the median over steps 8-16 of the
difference between solves stopped one step apart: deterministic).

Run:  .venv/bin/python benchmarks/overhead_bench.py --threads 1 [--repeats 3]
      [--batches 1,8,64,256,1024] [--widths 128,512,2048] [--capture] [--device cuda]
Writes benchmarks/results/overhead.md (overhead_cuda.md with --device cuda) and prints it.
With --capture on a GPU the Captured contenders compile with mode="reduce-overhead" (CUDA
graphs).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import equilibria as eq

TOL = 1e-4
RESULTS = Path(__file__).parent / "results" / "overhead.md"
DEVICE = torch.device("cpu")  # set by --device


def clock() -> float:
    """perf_counter after the device's queued work is done (a no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def make_case(batch: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W^T, c) with c = U x + b: the hard case of benchmarks/equilibrium_bench.py."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    spectrum = torch.linspace(-0.99, 0.99, width, dtype=torch.float64)
    w = ((q * spectrum) @ q.T).float()
    x = 0.1 * torch.randn(batch, width, generator=generator)
    u = torch.randn(width, width, generator=generator) / math.sqrt(width)
    b = 0.1 * torch.randn(width, generator=generator)
    return w.T.contiguous().to(DEVICE), (x @ u.T + b).to(DEVICE)


class Map:
    """f(z) = tanh(z W^T + c), counting batched calls."""

    def __init__(self, wt: torch.Tensor, c: torch.Tensor, plain: Callable | None = None
                 ) -> None:
        self.wt, self.c, self.calls, self.plain = wt, c, 0, plain

    def __call__(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(torch.addmm(self.c if c is None else c, z, self.wt))


def time_f(wt: torch.Tensor, c: torch.Tensor) -> float:
    f, z = Map(wt, c), torch.randn_like(c)
    for _ in range(5):
        f(z)
    times = []
    for _ in range(max(5, min(200, int(0.2 / max(_once(f, z), 1e-6))))):
        times.append(_once(f, z))
    return statistics.median(times)


def _once(f: Map, z: torch.Tensor) -> float:
    start = clock()
    f(z)
    return clock() - start


def ours(solver: eq.FixedPointSolver, max_steps: int = 1000) -> Callable:
    def run(f: Map) -> tuple[torch.Tensor, int]:
        sol = eq.fixed_point(f, torch.zeros_like(f.c), f.c, solver, atol=1e-30, rtol=TOL,
                             max_steps=max_steps)
        return sol.value, int(sol.stats["nfe"].max())
    return run


def captured(solver: eq.Captured, max_steps: int = 1000) -> Callable:
    """A Captured solver: f must be one object across calls (the compiled region guards on
    it), and may not count its calls (a Python side effect would be traced as a constant),
    so it gets the point's plain map and its evaluations are our nfe."""

    def run(f: Map) -> tuple[torch.Tensor, int]:
        sol = eq.fixed_point(f.plain, torch.zeros_like(f.c), f.c, solver, atol=1e-30,
                             rtol=TOL, max_steps=max_steps)
        return sol.value, int(sol.stats["nfe"].max())
    return run


def torchdeq(name: str, max_iter: int = 1000) -> Callable:
    from torchdeq.solver import get_solver

    solve = get_solver(name)

    def run(f: Map) -> tuple[torch.Tensor, int]:
        z, _, _ = solve(f, torch.zeros_like(f.c), max_iter=max_iter, tol=TOL, stop_mode="rel")
        return z, f.calls
    return run


def relative_residual(wt: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> float:
    r = torch.tanh(torch.addmm(c, z, wt)) - z
    return float((r.norm(dim=1) / z.norm(dim=1).clamp_min(1e-30)).max())


def step_ops(solver: eq.FixedPointSolver, batch: int = 1, width: int = 512) -> float:
    """Aten calls launching compute per common solver step beside f, as
    tests/test_step_ops.py counts them (the median over steps 8-16 of the difference between
    solves stopped one step apart)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_step_ops import calls_per_step

    return calls_per_step(solver, batch, width)


def points(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(batch, width) pairs: --points if given, else the --widths x --batches grid."""
    if args.points:
        try:
            return [(int(b), int(w)) for b, w in (p.split("x") for p in args.points.split(","))]
        except ValueError:
            raise SystemExit(f"--points: expected BATCHxWIDTH,..., e.g. 8x128,1x2048; got "
                             f"{args.points!r}") from None
    return [(int(b), int(w)) for w in args.widths.split(",") for b in args.batches.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,8,64,256,1024")
    parser.add_argument("--widths", default="128,512,2048")
    parser.add_argument("--points", default=None,
                        help="explicit BATCHxWIDTH points, e.g. 8x128,1x2048 (instead of the "
                        "--batches x --widths grid)")
    parser.add_argument("--capture", action="store_true",
                        help="also run Anderson and Picard under eq.Captured (torch.compile)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--output", default=None, help=f"results file (default {RESULTS})")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    cuda = DEVICE.type == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contenders: list[tuple[str, Callable]] = [
        ("ours Anderson", ours(eq.Anderson())),
        ("ours Picard", ours(eq.Picard())),
        ("ours Broyden", ours(eq.Broyden())),
        ("TorchDEQ anderson", torchdeq("anderson")),
        ("TorchDEQ fixed_point_iter", torchdeq("fixed_point_iter")),
        ("TorchDEQ broyden", torchdeq("broyden")),
    ]
    captures = []
    if args.capture:
        mode = "reduce-overhead" if cuda else None  # CUDA graphs on a GPU
        captures = [eq.Captured(eq.Anderson(), mode=mode), eq.Captured(eq.Picard(), mode=mode)]
        contenders[2:2] = [(f"ours Captured({type(c.solver).__name__})", captured(c))
                           for c in captures]
    lines = [
        "# Fixed cost per solver step: batch x width sweep vs TorchDEQ 0.1.0",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, "
        f"{torch.cuda.get_device_name(DEVICE) if cuda else 'CPU'}, {args.threads} thread(s); "
        "load average at start: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)",
        f"- command: `.venv/bin/python benchmarks/overhead_bench.py --threads {args.threads} "
        f"--repeats {args.repeats} "
        + (f"--points {args.points}" if args.points
           else f"--batches {args.batches} --widths {args.widths}")
        + f"{' --capture' if args.capture else ''}{f' --device {args.device}' if cuda else ''}"
        f"{f' --output {args.output}' if args.output else ''}`",
        "- hard spectrum, rel. residual 1e-4; overhead = wall / (evaluations x f); "
        "medians of round-robin rounds",
        "",
        "## Compute calls per step beside f (torch.profiler on CPU, batch 1 x width 512)",
        "",
        "| solver | aten calls per step |",
        "|---|---|",
    ]
    for name, solver in (("Anderson(m=5)", eq.Anderson()), ("Picard", eq.Picard()),
                         ("Broyden(memory=10)", eq.Broyden())):
        lines.append(f"| {name} | {step_ops(solver):.1f} |")
        print(lines[-1], flush=True)
    names = [name for name, _ in contenders]
    lines += [
        "",
        "## Sweep",
        "",
        "| batch x width | f ms | " + " | ".join(f"{n}: evals, ms, overhead" for n in names)
        + " | ours / TorchDEQ best | max rel. residual (ours best) |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for batch, width in points(args):
        wt, c = make_case(batch, width)

        def plain(z: torch.Tensor, x: torch.Tensor, wt: torch.Tensor = wt) -> torch.Tensor:
            return torch.tanh(torch.addmm(x, z, wt))

        if captures:  # compile outside the timed rounds; the time is reported below
            for name, run in contenders:
                if "Captured" in name:
                    with torch.no_grad():
                        run(Map(wt, c, plain))
        times: dict[str, list[float]] = {name: [] for name in names}
        evaluations, values, f_times = {}, {}, []
        for _ in range(args.repeats):
            f_times.append(time_f(wt, c))
            for name, run in contenders:
                f = Map(wt, c, plain)
                start = clock()
                with torch.no_grad():
                    z, evals = run(f)
                times[name].append(clock() - start)
                evaluations[name], values[name] = evals, z
        t_f = statistics.median(f_times)
        wall = {name: statistics.median(times[name]) for name in names}
        cells = [f"{evaluations[n]}, {wall[n] * 1e3:.1f}, "
                 f"{wall[n] / (evaluations[n] * t_f):.2f}" for n in names]
        best_ours = min((n for n in names if n.startswith("ours")), key=wall.get)
        best_peer = min((n for n in names if n.startswith("TorchDEQ")), key=wall.get)
        lines.append(
            f"| {batch} x {width} | {t_f * 1e3:.3f} | " + " | ".join(cells)
            + f" | {wall[best_ours] / wall[best_peer]:.2f} ({best_ours} / {best_peer}) | "
            f"{relative_residual(wt, c, values[best_ours]):.1e} |"
        )
        print(lines[-1], flush=True)
    for solver in captures:
        lines.append(f"\n- {solver!r}: compile time {solver.compile_seconds:.0f} s in all "
                     "(first calls, one compilation per shape, outside the timed rounds)")
    text = "\n".join(lines)
    output = Path(args.output) if args.output else (
        RESULTS.with_name("overhead_cuda.md") if cuda else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
