"""Stiff problems: equilibria's implicit Kvaerno3/Kvaerno5 side by side with scipy's Radau and
BDF, and SteadyState(<implicit>) on the equilibrium benchmark's hard case.

Problems (float64, rtol 1e-6, atol 1e-10 for every solver):

- Van der Pol, mu = 1000, t in [0, 3000], y0 = (2 + 0.1 u, 0) (u in [0, 1) per sample);
- Robertson's chemical kinetics, t in [0, 1e5], y0 = (1 - s, s, 0) (s in [0, 1e-6)).

Batch 1 and batch 256. scipy solves one sample at a time: at batch 256 it runs
--scipy-samples of the samples and the wall time is scaled to 256 (stated in the table).
Errors: max over the checked samples of |y - y_ref| / (atol + rtol |y_ref|) at t1, y_ref from
scipy's Radau at rtol 1e-12, atol 1e-14 with the analytic Jacobian. NFE: evaluations of f
per sample (ours: stages, Newton iterations and Jacobian columns; scipy: nfev, plus njev
Jacobian evaluations by its finite differences, listed apart). Contenders run round-robin
(interleaved) --repeats times; the median wall time is reported.

torchdiffeq 0.2.5 has no adaptive implicit method for stiff problems (its implicit_adams is
fixed-grid with fixed-point corrector iterations, which diverge when dt |lambda| > 1, and its
scipy_solver wraps scipy); torchode 1.0.1 is explicit only. Neither is a contender here.

Second table: fixed_point on the equilibrium benchmark's hard case (width 512, batch 256,
symmetric W with spectrum in [-0.99, 0.99], relative residual 1e-4), batched evaluations of
f (JVPs included) against Anderson's.

Run: .venv/bin/python benchmarks/stiff_bench.py [--repeats 1] [--scipy-samples 16] [--quick]
Writes benchmarks/results/stiff.md and prints it.
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

import numpy as np
import scipy
import torch
from scipy.integrate import solve_ivp

import equilibria as eq

sys.path.insert(0, str(Path(__file__).parent))
import equilibrium_bench  # noqa: E402  (the hard case and its counting f)

RESULTS = Path(__file__).parent / "results" / "stiff.md"
RTOL, ATOL = 1e-6, 1e-10
MU = 1000.0


def van_der_pol(t, y):
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, MU * (1 - x * x) * v - x], dim=1)


def robertson(t, y):
    y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2,
                        3e7 * y2 * y2], dim=1)


def vdp_np(t, y):
    return [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]]


def vdp_jac(t, y):
    return [[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1, MU * (1 - y[0] ** 2)]]


def rob_np(t, y):
    return [-0.04 * y[0] + 1e4 * y[1] * y[2],
            0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2]


def rob_jac(t, y):
    return [[-0.04, 1e4 * y[2], 1e4 * y[1]], [0.04, -1e4 * y[2] - 6e7 * y[1], -1e4 * y[1]],
            [0.0, 6e7 * y[1], 0.0]]


def problems(quick: bool):
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(256, generator=gen, dtype=torch.float64)
    vdp0 = torch.stack([2.0 + 0.1 * u, torch.zeros_like(u)], dim=1)
    s = 1e-6 * torch.rand(256, generator=gen, dtype=torch.float64)
    rob0 = torch.stack([1.0 - s, s, torch.zeros_like(s)], dim=1)
    return [
        ("Van der Pol mu=1000", van_der_pol, vdp_np, vdp_jac, vdp0, 300.0 if quick else 3000.0),
        ("Robertson", robertson, rob_np, rob_jac, rob0, 40.0 if quick else 1e5),
    ]


def reference(fun, jac, y0: np.ndarray, t1: float) -> np.ndarray:
    sol = solve_ivp(fun, (0.0, t1), y0, method="Radau", rtol=1e-12, atol=1e-14, jac=jac)
    assert sol.success, sol.message
    return sol.y[:, -1]


def scaled_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(y - ref) / (ATOL + RTOL * np.abs(ref))))


def run_ours(solver, f, y0, t1):
    def go():
        with torch.no_grad():
            sol = eq.odeint(f, y0, (0.0, t1), solver=solver, rtol=RTOL, atol=ATOL,
                            max_steps=200_000)
        return sol
    return go


def run_scipy(method, fun, y0, t1):
    def go():
        finals, nfev, njev, ok = [], [], [], True
        for row in y0.numpy():
            sol = solve_ivp(fun, (0.0, t1), row, method=method, rtol=RTOL, atol=ATOL)
            ok &= bool(sol.success)
            finals.append(sol.y[:, -1])
            nfev.append(sol.nfev)
            njev.append(sol.njev)
        return np.array(finals), np.array(nfev), np.array(njev), ok
    return go


def stiff_table(repeats: int, scipy_samples: int, quick: bool, checked: int) -> list[str]:
    lines = ["| problem | batch | solver | wall s (median) | NFE/sample mean (max) | "
             "Jacobians/sample | max scaled error | all ok | wall / scipy Radau (same batch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, f, fun, jac, y_all, t1 in problems(quick):
        refs = {}
        for batch in (1, 256):
            y0 = y_all[:batch]
            n_scipy = min(batch, scipy_samples)
            check = list(range(min(batch, checked)))
            for b in check:
                if b not in refs:
                    refs[b] = reference(fun, jac, y_all[b].numpy(), t1)
            contenders = {
                "equilibria Kvaerno3": run_ours(eq.Kvaerno3(), f, y0, t1),
                "equilibria Kvaerno5": run_ours(eq.Kvaerno5(), f, y0, t1),
                "scipy Radau": run_scipy("Radau", fun, y0[:n_scipy], t1),
                "scipy BDF": run_scipy("BDF", fun, y0[:n_scipy], t1),
            }
            # warm-up: the first call pays for lazy initialisation (vmap, LAPACK) once
            for solver in (eq.Kvaerno3(), eq.Kvaerno5()):
                run_ours(solver, f, y0, t1 / 100)()
            walls = {key: [] for key in contenders}
            results = {}
            for _ in range(repeats):  # round-robin: the machine's load hits all alike
                for key, go in contenders.items():
                    start = time.perf_counter()
                    results[key] = go()
                    walls[key].append(time.perf_counter() - start)
            rows = {}
            for key, result in results.items():
                wall = statistics.median(walls[key])
                if key.startswith("equilibria"):
                    sol = result
                    nfe = sol.stats["nfe"].double()
                    finals = sol.value.numpy()
                    ok = bool((sol.status == eq.Status.SUCCESS).all())
                    nfe_text = f"{nfe.mean():.0f} ({nfe.max():.0f})"
                    jac_text = "(in NFE)"
                    scale = 1.0
                else:
                    finals, nfev, njev, ok = result
                    nfe_text = f"{nfev.mean():.0f} ({nfev.max():.0f})"
                    jac_text = f"{njev.mean():.0f}"
                    scale = batch / n_scipy
                    wall *= scale
                error = max(scaled_error(finals[b], refs[b]) for b in check if b < len(finals))
                rows[key] = (wall, nfe_text, jac_text, error, ok, scale)
            radau = rows["scipy Radau"][0]
            for key, (wall, nfe_text, jac_text, error, ok, scale) in rows.items():
                note = f" (x{scale:.0f} from {n_scipy})" if scale != 1.0 else ""
                ratio = "" if key == "scipy Radau" else f"{wall / radau:.2f}"
                lines.append(f"| {name} | {batch} | {key}{note} | {wall:.2f} | {nfe_text} | "
                             f"{jac_text} | {error:.2f} | {ok} | {ratio} |")
    return lines


def steady_state_table() -> list[str]:
    torch.manual_seed(0)
    w, c = equilibrium_bench.make_case("hard")
    lines = ["| solver | batched f calls | evaluations (max nfe, JVPs included) | "
             "vs Anderson | SUCCESS | max rel. residual | wall s |",
             "|---|---|---|---|---|---|---|"]
    contenders = [
        ("Anderson", eq.Anderson(), 500),
        ("SteadyState(ImplicitEuler) (default)", eq.SteadyState(), 500),
        ("SteadyState(Kvaerno3)", eq.SteadyState(eq.Kvaerno3()), 500),
        ("SteadyState(Kvaerno5)", eq.SteadyState(eq.Kvaerno5()), 500),
        ("SteadyState(Tsit5)", eq.SteadyState(eq.Tsit5()), 2000),
    ]
    anderson = None
    for name, solver, max_steps in contenders:
        f = equilibrium_bench.Counter(w, c)
        start = time.perf_counter()
        with torch.no_grad():
            sol = eq.fixed_point(f, torch.zeros(equilibrium_bench.BATCH, equilibrium_bench.WIDTH),
                                 f.c, solver=solver, atol=1e-30, rtol=equilibrium_bench.TOL,
                                 max_steps=max_steps)
        wall = time.perf_counter() - start
        evaluations = int(sol.stats["nfe"].max())
        anderson = anderson or evaluations
        residual = float(equilibrium_bench.relative_residual(w, c, sol.value).max())
        ok = int((sol.status == eq.Status.SUCCESS).sum())
        lines.append(f"| {name} | {f.calls} | {evaluations} | {evaluations / anderson:.1f}x | "
                     f"{ok}/{equilibrium_bench.BATCH} | {residual:.1e} | {wall:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scipy-samples", type=int, default=16)
    parser.add_argument("--checked", type=int, default=4,
                        help="samples whose error is checked against the reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="short spans (for a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    command = "benchmarks/stiff_bench.py " + " ".join(sys.argv[1:])
    header = [
        "# Stiff problems: equilibria's ESDIRK solvers vs scipy Radau / BDF",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, scipy {scipy.__version__}, Python "
        f"{platform.python_version()}; torch threads {options.threads}, os.cpu_count() "
        f"{os.cpu_count()}",
        f"- command: `.venv/bin/python {command.strip()}`",
        f"- float64, rtol {RTOL}, atol {ATOL}, every solver; error in units of the tolerance "
        "against scipy Radau at rtol 1e-12 (analytic Jacobian), over the first "
        f"{options.checked} samples; wall = median of {options.repeats} interleaved run(s).",
        "- scipy solves one sample at a time: at batch 256 it ran "
        f"{options.scipy_samples} samples, wall time scaled to 256.",
        "- torchdiffeq 0.2.5 / torchode 1.0.1 have no adaptive implicit solver (see the "
        "script's docstring): not contenders.",
        "- caveat: the machine's 2 cores were shared with other jobs; timings are noisy.",
        "",
    ]
    lines = header + stiff_table(options.repeats, options.scipy_samples, options.quick,
                                 options.checked)
    lines += ["", "## SteadyState with an implicit solver on the equilibrium hard case", "",
              "fixed_point(f, z0 = 0) with f(z) = tanh(W z + c), width 512, batch 256, float32, "
              "symmetric W with spectrum in [-0.99, 0.99], stop at relative residual 1e-4 per "
              "sample (benchmarks/equilibrium_bench.py's hard case).", ""]
    lines += steady_state_table()
    text = "\n".join(lines) + "\n"
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
