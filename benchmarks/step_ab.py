"""Interleaved A/B of the fixed-point solvers' cost per step against another checkout.

Wall-time figures on a shared CPU drift with the load, so the two versions run in one
process, alternating solve by solve (`--rounds` each), one thread, and the ratio of medians is
reported, with the overhead wall / (nfe x one f) of each (f timed by one call on a fresh z
every 10 rounds: slower than f inside a solve), this version's overhead in situ (every 10
rounds, one extra solve whose f times itself: wall / time spent inside f; the stricter figure)
and whether both gave bit-identical results (value, status, residual, n_steps, nfe).
Problem: `overhead_bench.py`'s hard case, f = tanh(W z + U x + b), rel. residual 1e-4.

Run:  mkdir /tmp/base && git archive <commit> src | tar -x -C /tmp/base
      PYTHONPATH=src .venv/bin/python benchmarks/step_ab.py /tmp/base [--batch 1]
      [--width 512] [--rounds 300] [--solvers Anderson,Picard,Broyden]
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import equilibria as eq  # noqa: E402
from equilibria.equilibrium import FixedPointSolver  # noqa: E402
from overhead_bench import make_case  # noqa: E402


def load_baseline(checkout: Path):
    """The other checkout's package under the name `equilibria_baseline` (its imports are
    relative, so a renamed copy imports beside this one)."""
    folder = Path(tempfile.mkdtemp())
    shutil.copytree(checkout / "src" / "equilibria", folder / "equilibria_baseline")
    sys.path.insert(0, str(folder))
    return importlib.import_module("equilibria_baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline", type=Path, help="root of the other checkout")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--solvers", default="Anderson,Picard",
                        help="comma-separated solver classes (default Anderson,Picard)")
    args = parser.parse_args()
    unknown = [n for n in args.solvers.split(",") if not isinstance(getattr(eq, n, None), type)
               or not issubclass(getattr(eq, n), FixedPointSolver)]
    if unknown:
        parser.error(f"--solvers: {', '.join(unknown)} is not a solver class of equilibria; "
                     "e.g. --solvers Anderson,Picard,Broyden")
    torch.set_num_threads(1)
    base = load_baseline(args.baseline)
    wt, c = make_case(args.batch, args.width)

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addmm(x, z, wt))

    inside = [0.0]

    def timed_f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = f(z, x)
        inside[0] += time.perf_counter() - start
        return out

    def solve(module, solver, fn=f):
        return module.fixed_point(fn, torch.zeros_like(c), c, solver, atol=1e-30, rtol=1e-4,
                                  max_steps=1000)

    for name in args.solvers.split(","):
        versions = {"baseline": (base, getattr(base, name)()), "this": (eq, getattr(eq, name)())}
        times: dict[str, list[float]] = {key: [] for key in versions}
        f_times, situ = [], []
        with torch.no_grad():
            results = {key: solve(*pair) for key, pair in versions.items()}
            for round_index in range(args.rounds):
                if round_index % 10 == 0:
                    z = torch.randn_like(c)
                    start = time.perf_counter()
                    f(z, c)
                    f_times.append(time.perf_counter() - start)
                    inside[0], start = 0.0, time.perf_counter()
                    solve(*versions["this"], fn=timed_f)
                    situ.append((time.perf_counter() - start) / inside[0])
                order = list(versions) if round_index % 2 == 0 else list(versions)[::-1]
                for key in order:
                    start = time.perf_counter()
                    solve(*versions[key])
                    times[key].append(time.perf_counter() - start)
        t_f = statistics.median(f_times)
        old, new = results["baseline"], results["this"]
        same = (torch.equal(old.value, new.value) and torch.equal(old.status, new.status)
                and all(torch.equal(old.stats[k], new.stats[k])
                        for k in ("residual", "n_steps", "nfe")))
        wall = {key: statistics.median(values) for key, values in times.items()}
        nfe = {key: int(results[key].stats["nfe"].max()) for key in versions}
        print(f"{name} {args.batch} x {args.width}: f {t_f * 1e6:.1f} us, nfe {nfe['this']}; "
              f"wall baseline {wall['baseline'] * 1e3:.3f} ms, this {wall['this'] * 1e3:.3f} ms"
              f", this / baseline {wall['this'] / wall['baseline']:.3f}; overhead baseline "
              f"{wall['baseline'] / (nfe['baseline'] * t_f):.2f}, this "
              f"{wall['this'] / (nfe['this'] * t_f):.2f} (in situ, wall / time inside f: "
              f"{statistics.median(situ):.2f}); bit-identical {same}", flush=True)


if __name__ == "__main__":
    main()
