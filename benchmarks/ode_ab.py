"""Interleaved A/B of `odeint`'s cost per step against another checkout, beside torchode.

The per-step cost of an ODE solve on a cheap field is the integrator's own work (stage sums,
step-size control, statuses), which is what small batches and GPUs expose. The two versions
(and torchode, when installed) run in one process, alternating solve by solve, one thread;
medians, ratios, and whether the two versions gave bit-identical results (value, status,
steps, evaluations). Field: f(t, y) = tanh(y A^T), A 64 x 64, t in [0, 10], rtol 1e-6,
atol 1e-8, no autograd.

Run:  mkdir /tmp/base && git archive <commit> src | tar -x -C /tmp/base
      PYTHONPATH=src .venv/bin/python benchmarks/ode_ab.py /tmp/base [--batch 1]
      [--rounds 40] [--solvers Tsit5,Dopri5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import equilibria as eq  # noqa: E402
from step_ab import load_baseline  # noqa: E402

try:
    import torchode
except ImportError:  # pragma: no cover - the bench extra installs it
    torchode = None

DIM, SPAN, RTOL, ATOL = 64, (0.0, 10.0), 1e-6, 1e-8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline", type=Path, help="root of the other checkout")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--solvers", default="Tsit5,Dopri5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_baseline(args.baseline)
    gen = torch.Generator().manual_seed(3)
    a_mat = torch.randn(DIM, DIM, generator=gen) / 8
    y0 = torch.randn(args.batch, DIM, generator=gen)

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ a_mat.T)

    for name in args.solvers.split(","):
        runs = {}
        for label, module in (("baseline", base), ("this", eq)):
            solver = getattr(module, name)()

            def run(module=module, solver=solver):
                with torch.no_grad():
                    return module.odeint(field, y0, SPAN, solver=solver, rtol=RTOL, atol=ATOL)
            runs[label] = run
        if torchode is not None and hasattr(torchode, name):
            term = torchode.ODETerm(field)
            peer = torchode.AutoDiffAdjoint(
                getattr(torchode, name)(term=term),
                torchode.IntegralController(atol=ATOL, rtol=RTOL, term=term))

            def run_peer(peer=peer):
                with torch.no_grad():
                    return peer.solve(torchode.InitialValueProblem(
                        y0=y0, t_start=torch.full((args.batch,), SPAN[0]),
                        t_end=torch.full((args.batch,), SPAN[1])))
            runs["torchode"] = run_peer
        for run in runs.values():  # warm-up
            run()
        times: dict[str, list[float]] = {label: [] for label in runs}
        results = {}
        for _ in range(args.rounds):
            for label, run in runs.items():
                start = time.perf_counter()
                results[label] = run()
                times[label].append(time.perf_counter() - start)
        wall = {label: statistics.median(t) for label, t in times.items()}
        a, b = results["baseline"], results["this"]
        identical = (torch.equal(a.value, b.value) and torch.equal(a.status, b.status)
                     and all(torch.equal(a.stats[k], b.stats[k])
                             for k in ("nfe", "n_steps", "n_rejected")))
        steps = int((b.stats["n_steps"] + b.stats["n_rejected"]).max())
        line = (f"{name}, batch {args.batch}: this {wall['this'] * 1e3:.2f} ms, baseline "
                f"{wall['baseline'] * 1e3:.2f} ms ({wall['this'] / wall['baseline']:.3f}x), "
                f"{steps} steps ({wall['this'] / steps * 1e6:.0f} us a step), "
                f"bit-identical: {identical}")
        if "torchode" in wall:
            peer_steps = int(results["torchode"].stats["n_steps"].max())
            line += (f"; torchode {wall['torchode'] * 1e3:.2f} ms, {peer_steps} steps "
                     f"(this / torchode {wall['this'] / wall['torchode']:.3f})")
        print(line, flush=True)


if __name__ == "__main__":
    main()
