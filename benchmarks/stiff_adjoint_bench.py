"""Gradients through a stiff problem: the checkpointed adjoint against Backprop and the
continuous adjoint.

Robertson's kinetics with its three rate constants as parameters, t in [0, 5], Kvaerno5,
float64, rtol 1e-8, atol 1e-12, batch --batch with y0 = (1 - s, 0, s) (s = 0 for sample 0,
uniform in [0, 0.2) for the rest). Loss L = sum_b w_b . y_b(5), w random (y2 weighted 1e4).
One training step (forward + backward) per method, run round-robin --repeats times, median
wall time. Gradient error: relative norm error of dL/dk against float64 central differences of
scipy's Radau at rtol 1e-13 (h = 1e-5 k_i).

Run: .venv/bin/python benchmarks/stiff_adjoint_bench.py [--repeats 3] [--batch 8]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

import equilibria as eq
from equilibria.ode import Adjoint, odeint, odeint_adjoint

T1 = 5.0
OPTIONS = dict(solver=eq.Kvaerno5(), rtol=1e-8, atol=1e-12)


class Robertson(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([0.04, 1e4, 3e7], dtype=torch.float64))

    def forward(self, t, y):
        k1, k2, k3 = self.k
        y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
        return torch.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2 * y2,
                            k3 * y2 * y2], dim=1)


def scipy_loss(k, y0, w):
    k1, k2, k3 = k

    def fun(t, y):
        return [-k1 * y[0] + k2 * y[1] * y[2], k1 * y[0] - k2 * y[1] * y[2] - k3 * y[1] ** 2,
                k3 * y[1] ** 2]

    def jac(t, y):
        return [[-k1, k2 * y[2], k2 * y[1]], [k1, -k2 * y[2] - 2 * k3 * y[1], -k2 * y[1]],
                [0.0, 2 * k3 * y[1], 0.0]]

    total = 0.0
    for b in range(y0.shape[0]):
        sol = solve_ivp(fun, (0.0, T1), y0[b], method="Radau", rtol=1e-13, atol=1e-16, jac=jac)
        total += float(np.dot(w[b], sol.y[:, -1]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    gen = torch.Generator().manual_seed(0)
    third = 0.2 * torch.rand(opts.batch, generator=gen, dtype=torch.float64)
    third[0] = 0.0
    y0 = torch.stack([1.0 - third, torch.zeros_like(third), third], dim=1)
    w = torch.randn(opts.batch, 3, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.0, 1e4, 1.0], dtype=torch.float64)
    field = Robertson()
    k = field.k.detach().numpy()
    reference = []
    for i in range(3):
        e = np.eye(3)[i] * 1e-5 * k[i]
        reference.append((scipy_loss(k + e, y0.numpy(), w.numpy())
                          - scipy_loss(k - e, y0.numpy(), w.numpy())) / (2 * e[i]))
    reference = torch.tensor(reference)

    def checkpointed():
        sol = odeint_adjoint(field, y0, (0.0, T1), **OPTIONS)
        (grad,) = torch.autograd.grad((sol.value * w).sum(), [field.k])
        return grad, sol.stats["adjoint_status"], int(sol.stats["adjoint_checkpoints"])

    def backprop():
        sol = odeint(field, y0, (0.0, T1), **OPTIONS)
        (grad,) = torch.autograd.grad((sol.value * w).sum(), [field.k])
        return grad, 0, None

    def continuous():
        sol = odeint_adjoint(field, y0, (0.0, T1), **OPTIONS,
                             gradient=Adjoint(checkpoints=False, max_steps=500))
        (grad,) = torch.autograd.grad((sol.value * w).sum(), [field.k])
        return grad, sol.stats["adjoint_status"], None

    methods = {"Adjoint() (checkpointed, automatic for Kvaerno5)": checkpointed,
               "Backprop()": backprop,
               "Adjoint(checkpoints=False, max_steps=500) (continuous)": continuous}
    times = {name: [] for name in methods}
    results = {}
    for _ in range(opts.repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    print(f"Robertson [0, {T1}], Kvaerno5, rtol 1e-8, atol 1e-12, batch {opts.batch}, "
          f"{opts.threads} thread(s), median of {opts.repeats}")
    print("| method | wall s (fwd + bwd) | dL/dk rel. error vs FD | adjoint status |")
    print("|---|---|---|---|")
    for name in methods:
        grad, status, _ = results[name]
        error = float((grad - reference).norm() / reference.norm())
        print(f"| {name} | {statistics.median(times[name]):.2f} | {error:.1e} | "
              f"{eq.Status(status).name} |")
    print(f"checkpoints kept: {results[next(iter(methods))][2]} states of 3 numbers")


if __name__ == "__main__":
    main()
