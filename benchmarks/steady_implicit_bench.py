"""SteadyState with implicit ESDIRK methods against ImplicitEuler and Anderson on the
equilibrium benchmark's cases (benchmarks/equilibrium_bench.py: tanh(W z + U x + b), width
512, batch 256, float32, relative residual 1e-4 per sample).

Per solver and case: evaluations (max over samples of our nfe, JVPs included), batched f
calls, steps, wall time (median of the repeats, the solvers run round robin), SUCCESS count
and the relative residual reached (max over samples, recomputed).

Run:  .venv/bin/python benchmarks/steady_implicit_bench.py [--repeats 5] [--threads 1]
Writes benchmarks/results/steady_implicit.md and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch

import equilibria as eq
import equilibrium_bench as bench

RESULTS = Path(__file__).parent / "results" / "steady_implicit.md"
SOLVERS = {
    "Anderson(m=5)": lambda: eq.Anderson(),
    "SteadyState() (ImplicitEuler)": lambda: eq.SteadyState(),
    "SteadyState(Kvaerno3())": lambda: eq.SteadyState(eq.Kvaerno3()),
    "SteadyState(Kvaerno5())": lambda: eq.SteadyState(eq.Kvaerno5()),
}


def run(name: str, w: torch.Tensor, c: torch.Tensor) -> tuple[float, dict]:
    f = bench.Counter(w, c)
    start = time.perf_counter()
    with torch.no_grad():
        sol = eq.fixed_point(f, torch.zeros(bench.BATCH, bench.WIDTH), f.c,
                             solver=SOLVERS[name](), atol=1e-30, rtol=bench.TOL, max_steps=500)
    wall = time.perf_counter() - start
    return wall, {"evals": int(sol.stats["nfe"].max()), "calls": f.calls,
                  "steps": int(sol.stats["n_steps"].max()),
                  "ok": int((sol.status == eq.Status.SUCCESS).sum()),
                  "residual": float(bench.relative_residual(w, c, sol.value).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    lines = ["# SteadyState with implicit methods on the equilibrium cases", "",
             f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch "
             f"{torch.__version__}, {options.threads} thread(s), median of "
             f"{options.repeats} round-robin repeats; machine shared (timings noisy)", ""]
    for case in ("hard", "easy"):
        w, c = bench.make_case(case)
        walls: dict[str, list[float]] = {name: [] for name in SOLVERS}
        found = {}
        for _ in range(options.repeats):
            for name in SOLVERS:
                wall, found[name] = run(name, w, c)
                walls[name].append(wall)
        anderson = found["Anderson(m=5)"]["evals"]
        lines += [f"## {case} case", "",
                  "| solver | evaluations | vs Anderson | f calls | steps | wall ms | SUCCESS "
                  "| max rel. residual |", "|---|---|---|---|---|---|---|---|"]
        for name, row in found.items():
            lines.append(f"| {name} | {row['evals']} | {row['evals'] / anderson:.2f}x | "
                         f"{row['calls']} | {row['steps']} | "
                         f"{statistics.median(walls[name]) * 1e3:.0f} | {row['ok']}/"
                         f"{bench.BATCH} | {row['residual']:.1e} |")
        lines.append("")
    text = "\n".join(lines)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
