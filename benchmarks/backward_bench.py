"""Backward-pass benchmark: Implicit vs Unrolled (and TorchDEQ's IFT) at equal gradient accuracy.

Problem (issue 3): f(z, x) = tanh(W z + U x + b), width 512, batch 256, float32;
    easy: random W scaled to spectral norm 0.9, x ~ N(0, 1);
    hard: symmetric W = Q diag(linspace(-0.99, 0.99)) Qᵀ, x scaled by 0.1;
U ~ N(0, 1/width), b = 0. Loss L = Σ c·z* / batch with a fixed random c.

For every method a tolerance knob is swept (forward rtol, and the backward solve's rtol set to
the same value); the gradient w.r.t. (W, U, b) is compared with a float64 reference (z* to
rounding, adjoint solved to 1e-13). For each target accuracy the loosest tolerance that meets
it is timed: median over repeats of forward and backward wall time, NFE (forward; backward =
VJPs of the adjoint solve + 1, or the unrolled evaluations), and the bytes autograd saves for
backward during the forward (torch.autograd.graph.saved_tensors_hooks).

Run:  .venv/bin/python benchmarks/backward_bench.py            (writes results/backward.md)
      .venv/bin/python benchmarks/backward_bench.py --quick    (fewer tolerances/repeats)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import equilibria as eq

WIDTH, BATCH = 512, 256
RESULTS = Path(__file__).parent / "results" / "backward.md"


class Cell(nn.Module):
    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.U = nn.Parameter(U.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(z, self.W) + F.linear(x, self.U, self.b))


def make_case(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    if name == "easy":
        W = randn(WIDTH, WIDTH)
        W *= 0.9 / torch.linalg.matrix_norm(W, 2)
        x = randn(BATCH, WIDTH)
    else:
        Q, _ = torch.linalg.qr(randn(WIDTH, WIDTH))
        W = Q @ torch.diag(torch.linspace(-0.99, 0.99, WIDTH, dtype=torch.float64)) @ Q.T
        x = 0.1 * randn(BATCH, WIDTH)
    U = randn(WIDTH, WIDTH) / WIDTH**0.5
    return {"W": W, "U": U, "b": torch.zeros(WIDTH, dtype=torch.float64), "x": x,
            "c": randn(BATCH, WIDTH)}


def reference_gradient(case: dict[str, torch.Tensor]) -> torch.Tensor:
    cell = Cell(case["W"], case["U"], case["b"])
    deq = eq.DEQ(cell, solver=eq.Anderson(), atol=1e-13, rtol=1e-13, max_steps=1000,
                 backward=eq.Implicit(eq.GMRES(atol=1e-15, rtol=1e-13, max_iters=2000,
                                               restart=50)))
    loss = (case["c"] * deq(case["x"])).sum() / BATCH
    grads = torch.autograd.grad(loss, list(cell.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@dataclass
class Run:
    forward_s: float
    backward_s: float
    forward_nfe: float
    backward_nfe: float
    saved_mb: float
    error: float


Method = Callable[[Cell, torch.Tensor, float], tuple[torch.Tensor, Callable[[], tuple]]]


def ours(backward_for: Callable[[float], object], solver: object) -> Method:
    def run(cell: Cell, x: torch.Tensor, tol: float):
        deq = eq.DEQ(cell, solver=solver, backward=backward_for(tol), atol=1e-9, rtol=tol,
                     max_steps=500)
        z = deq(x)

        def nfe() -> tuple[float, float]:
            forward = float(deq.last_solution.stats["nfe"].float().mean())
            stats = deq.last_backward_stats
            return forward, float(stats["nfe"].float().mean()) if stats else float("nan")

        return z, nfe

    return run


def torchdeq_method(b_solver: str) -> Method:
    from torchdeq import get_deq

    def run(cell: Cell, x: torch.Tensor, tol: float):
        deq = get_deq(f_solver="anderson", f_max_iter=500, f_tol=tol, f_stop_mode="rel",
                      b_solver=b_solver, b_max_iter=500, b_tol=tol, b_stop_mode="rel", ift=True)
        infos: dict[str, object] = {}

        def writer(info: dict) -> None:
            infos["backward"] = info

        z_out, info = deq(lambda z: cell(z, x), torch.zeros_like(x), backward_writer=writer)

        def nfe() -> tuple[float, float]:
            backward = infos.get("backward")
            # TorchDEQ's solvers stop the whole batch together: nstep is the batch's count.
            return (float(info["nstep"].float().mean()) + 1,
                    float(backward["nstep"].float().mean()) + 1 if backward else float("nan"))

        return z_out[-1], nfe

    return run


def measure(method: Method, case: dict[str, torch.Tensor], tol: float,
            reference: torch.Tensor) -> Run:
    cell = Cell(case["W"].float(), case["U"].float(), case["b"].float())
    x, c = case["x"].float(), case["c"].float()
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        z, nfe = method(cell, x, tol)
        loss = (c * z).sum() / BATCH
    middle = time.perf_counter()
    grads = torch.autograd.grad(loss, list(cell.parameters()))
    end = time.perf_counter()
    grad = torch.cat([g.reshape(-1) for g in grads]).double()
    error = float((grad - reference).norm() / reference.norm())
    forward_nfe, backward_nfe = nfe()
    return Run(middle - start, end - middle, forward_nfe, backward_nfe, saved / 2**20, error)


def f_eval_ms(case: dict[str, torch.Tensor], repeats: int = 50) -> float:
    cell = Cell(case["W"].float(), case["U"].float(), case["b"].float())
    x = case["x"].float()
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(5):
            cell(z, x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cell(z, x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def methods(with_torchdeq: bool) -> dict[str, Method]:
    table: dict[str, Method] = {
        "ours Implicit(GMRES)": ours(
            lambda tol: eq.Implicit(eq.GMRES(atol=1e-9, rtol=tol, max_iters=500)), eq.Anderson()
        ),
        "ours Implicit(Anderson)": ours(
            lambda tol: eq.Implicit(eq.Anderson(), atol=1e-9, rtol=tol, max_steps=500),
            eq.Anderson(),
        ),
        "ours Implicit(Picard)": ours(
            lambda tol: eq.Implicit(eq.Picard(), atol=1e-9, rtol=tol, max_steps=500),
            eq.Anderson(),
        ),
        "ours Unrolled (Anderson fwd)": ours(lambda tol: eq.Unrolled(), eq.Anderson()),
        "ours Unrolled (Picard fwd)": ours(lambda tol: eq.Unrolled(), eq.Picard()),
    }
    if with_torchdeq:
        table["TorchDEQ IFT (anderson bwd)"] = torchdeq_method("anderson")
        table["TorchDEQ IFT (fixed_point_iter bwd)"] = torchdeq_method("fixed_point_iter")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="fewer tolerances and repeats")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import torchdeq  # noqa: F401

        with_torchdeq = True
    except ImportError:
        with_torchdeq = False
    # half-decade steps: "equal accuracy" is then resolved to a factor of about 3
    tolerances = ([1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6] if not args.quick
                  else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    targets = [1e-2, 1e-4]
    repeats = 2 if args.quick else args.repeats

    lines = [
        "# Backward pass: Implicit vs Unrolled at equal gradient accuracy",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch "
        f"{torch.__version__}, {args.threads} threads, load average at start "
        f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs). "
        f"Command: `.venv/bin/python benchmarks/backward_bench.py --threads {args.threads}"
        f"{' --quick' if args.quick else ''}`.",
        "",
        "f(z, x) = tanh(Wz + Ux + b), width 512, batch 256, float32. Gradient error: relative "
        "2-norm error of dL/d(W, U, b) against a float64 reference. For each target the "
        "loosest swept tolerance (forward rtol = backward rtol) that meets it is timed "
        f"(median of {repeats}). NFE: mean per sample (forward: evaluations of f; backward: "
        "VJPs, incl. the final one through f, or the evaluations backpropagated by Unrolled). "
        "Saved MB: bytes autograd keeps for backward after the forward. TorchDEQ stops the "
        "whole batch together (max over samples), ours per sample.",
        "",
    ]
    for case_name in ("easy", "hard"):
        case = make_case(case_name)
        reference = reference_gradient(case)
        one_f = f_eval_ms(case)
        table = methods(with_torchdeq)
        # 1. sweep: gradient error against tolerance, pick the loosest tol meeting each target
        sweeps = {}
        for name, method in table.items():
            sweeps[name] = {tol: measure(method, case, tol, reference) for tol in tolerances}
            print(f"{case_name} {name}: " + ", ".join(
                f"{tol:.0e} -> {run.error:.1e}" for tol, run in sweeps[name].items()), flush=True)
        chosen: dict[tuple[str, float], float | None] = {}
        for name in table:
            for target in targets:
                meeting = [tol for tol, run in sweeps[name].items() if run.error <= target]
                chosen[name, target] = max(meeting) if meeting else None
        # 2. time the chosen settings, methods interleaved in every round so that the load
        #    of the shared machine falls on all of them alike
        timed: dict[tuple[str, float], list[Run]] = {
            (name, tol): [] for (name, _), tol in chosen.items() if tol is not None
        }
        for _ in range(repeats):
            for name, tol in timed:
                timed[name, tol].append(measure(table[name], case, tol, reference))
        lines += [f"## {case_name} case (one f evaluation {one_f:.2f} ms)", "",
                  "| method | target err | tol | grad err | fwd NFE | bwd NFE | fwd ms | bwd ms "
                  "| total ms | saved MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for target in targets:
            for name in table:
                tol = chosen[name, target]
                if tol is None:
                    best = min(sweeps[name].values(), key=lambda run: run.error)
                    lines.append(f"| {name} | {target:.0e} | — | best {best.error:.1e} "
                                 "| | | | | | (not reached) |")
                    continue
                runs = timed[name, tol]
                fwd = 1e3 * statistics.median(run.forward_s for run in runs)
                bwd = 1e3 * statistics.median(run.backward_s for run in runs)
                run = runs[0]
                lines.append(
                    f"| {name} | {target:.0e} | {tol:.0e} | {run.error:.1e} "
                    f"| {run.forward_nfe:.1f} | {run.backward_nfe:.1f} | {fwd:.0f} | {bwd:.0f} "
                    f"| {fwd + bwd:.0f} | {run.saved_mb:.1f} |"
                )
        lines += ["", f"Gradient error against tolerance ({case_name}):", "",
                  "| method | " + " | ".join(f"tol {tol:.0e}" for tol in tolerances) + " |",
                  "|---|" + "---|" * len(tolerances)]
        lines += [f"| {name} | " + " | ".join(f"{sweeps[name][tol].error:.1e}"
                                              for tol in tolerances) + " |" for name in table]
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
