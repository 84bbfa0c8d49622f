"""The floor of Anderson's step cost: a bare eager loop of the same aten calls, against the
library's solve, interleaved.

The bare loop issues per step exactly the calls of the library's common Anderson step (the
mixing's batched solve, its finiteness read and bmm; f; the history, Gram-row and norm
writes; the fused test's addmm and host read), with the same shapes and out= forms, on
buffers and views made once, and nothing else: no statuses, no best iterate, no dict, no
method dispatch. It runs as many steps as the library needed, and its last iterate must
equal the library's value bit for bit (checked), so it is the same arithmetic: at batch 1,
where every step but the last is the loop's common step (with more rows, rows that stop
early keep their frozen value in the library, so the check says False there). "bare now"
models the calls after the step-cost work at batch 1 (host reads instead of the finiteness
sum and the fused test's addmm; the library makes those reads only for a few rows). Overheads are
wall / (nfe x one f), f timed in the same rounds; the floor is what eager PyTorch costs for
this algorithm, the gap to it what the library adds.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/anderson_floor.py
      [--batch 1] [--width 512] [--rounds 200]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import equilibria as eq  # noqa: E402
from overhead_bench import make_case  # noqa: E402

M, REG, RTOL = 5, 1e-8, 1e-4


def bare_anderson(wt: torch.Tensor, c: torch.Tensor, n_steps: int, host_reads: bool = False
                  ) -> torch.Tensor:
    """`n_steps` Anderson(m=5) steps from z0 = 0 by the library's calls, nothing else: with
    `host_reads` its calls now (batch 1: the finiteness check and the fused test read the
    values on the host), without them its calls before the step-cost work (a sum and its
    read; addmm, amin and a read)."""
    batch, width = c.shape
    z = torch.zeros_like(c)
    fz = torch.tanh(torch.addmm(c, z, wt))
    history = z.new_empty(M, 2, batch, width).permute(2, 0, 1, 3)
    kkt = z.new_zeros(batch, M + 1, M + 1)
    kkt[:, 0, 1:] = 1
    kkt[:, 1:, 0] = 1
    norms = z.new_zeros(M + 1, batch).T
    rhs = z.new_zeros(1, M + 1, 1)
    rhs[0, 0, 0] = 1.0
    row_scale = torch.eye(M, dtype=z.dtype).mul_(REG).add_(1.0).unsqueeze(0).expand(batch, -1, -1)
    rhs = rhs.expand(batch, -1, -1)
    record_views, mix_views = {}, {}

    def views(slot, count):  # made once per (slot, count), as the library caches them
        if (slot, count) not in record_views:
            g = history[:, slot, 1]
            record_views[slot, count] = (
                history[:, slot, 0], g, g.unsqueeze(1), history[:, :count, 1].transpose(1, 2),
                row_scale[:, slot : slot + 1, :count],
                kkt[:, slot + 1 : slot + 2, 1 : count + 1],
                kkt[:, 1 : count + 1, slot + 1].unsqueeze(1),
                kkt.diagonal(dim1=1, dim2=2)[:, 1 : count + 1], norms[:, :count], norms[:, M])
            mix_views[count] = (kkt[:, : count + 1, : count + 1], rhs[:, : count + 1],
                                history[:, :count, 0])
        return record_views[slot, count]

    # the fused test's weights and bias (the values do not matter for the cost)
    weights = z.new_zeros(M + 1, 2)
    bias = z.new_zeros(1, 2).expand(batch, 2)
    bias_host = bias.tolist()

    def record(z, fz, slot, count):
        f_view, g, g_row, g_columns, scale, kkt_row, kkt_column, diagonal, norms_g, norms_z = (
            views(slot, count))
        f_view.copy_(fz)
        torch.sub(fz, z, out=g)
        row = torch.bmm(g_row, g_columns)
        torch.mul(row, scale, out=kkt_row)
        torch.mul(row, scale, out=kkt_column)
        torch.sqrt(diagonal, out=norms_g)
        torch.linalg.vector_norm(z, dim=1, out=norms_z)

    record(z, fz, 0, 1)
    for step_index in range(n_steps):
        count = min(step_index + 1, M)
        if count == 1:
            z = fz
        else:
            system, right, rows = mix_views[count]
            solution, _ = torch.linalg.solve_ex(system, right, check_errors=False)
            if host_reads:
                math.isfinite(sum(sum(row) for sample in solution.tolist() for row in sample))
            else:
                math.isfinite(float(solution.sum()))
            z = torch.bmm(solution[:, 1:].reshape(batch, 1, count), rows).reshape(batch, width)
        fz = torch.tanh(torch.addmm(c, z, wt))
        record(z, fz, (step_index + 1) % M, min(step_index + 2, M))
        if host_reads:  # the host fused test's arithmetic (columns and weights arbitrary)
            low = math.inf
            for values, (bias_test, bias_best) in zip(norms.tolist(), bias_host):
                test = bias_test + (0.5 * values[1] + -0.5 * values[M])
                best = bias_best + -0.5 * values[1] + 0.5 * values[0]
                if test != test or best != best:
                    break
                low = min(low, test, best)
        else:
            float(torch.addmm(bias, norms, weights).amin())
    return z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wt, c = make_case(args.batch, args.width)

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addmm(x, z, wt))

    def library():
        return eq.fixed_point(f, torch.zeros_like(c), c, eq.Anderson(m=M, regularization=REG),
                              atol=1e-30, rtol=RTOL, max_steps=1000)

    with torch.no_grad():
        solution = library()
        n_steps, nfe = int(solution.stats["n_steps"].max()), int(solution.stats["nfe"].max())
        same = all(torch.equal(bare_anderson(wt, c, n_steps, host), solution.value)
                   for host in (False, True))
        z = torch.randn_like(c)

        def f_loop():
            for _ in range(nfe):
                f(z, c)

        runs = {"f x nfe": f_loop, "bare": lambda: bare_anderson(wt, c, n_steps),
                "bare now": lambda: bare_anderson(wt, c, n_steps, host_reads=True),
                "library": library}
        times: dict[str, list[float]] = {key: [] for key in runs}
        one_f = []  # one call alone, as step_ab.py times f
        for round_index in range(args.rounds):
            start = time.perf_counter()
            f(z, c)
            one_f.append(time.perf_counter() - start)
            order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]
            for key in order:
                start = time.perf_counter()
                runs[key]()
                times[key].append(time.perf_counter() - start)
    wall = {key: statistics.median(values) for key, values in times.items()}
    t_loop, t_one = wall["f x nfe"], statistics.median(one_f)
    print(f"Anderson {args.batch} x {args.width}: nfe {nfe}, steps {n_steps}; f {t_one * 1e6:.1f}"
          f" us alone, {t_loop / nfe * 1e6:.1f} us in a loop; wall (ms): " + ", ".join(
              f"{key} {value * 1e3:.3f}" for key, value in wall.items()))
    for name, t_f in (("one f alone (step_ab.py)", t_one * nfe), ("f in a loop", t_loop)):
        print(f"  overhead by {name}: " + ", ".join(
            f"{key} {wall[key] / t_f:.2f}" for key in ("bare", "bare now", "library")))
    print("  per step beyond f (in a loop): " + ", ".join(
        f"{key} {(wall[key] - t_loop) / n_steps * 1e6:.1f} us"
        for key in ("bare", "bare now", "library"))
        + f"; library / bare {wall['library'] / wall['bare']:.3f}; bare == library value {same}")

if __name__ == "__main__":
    main()
