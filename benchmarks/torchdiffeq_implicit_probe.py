"""torchdiffeq's implicit method on a stiff problem: is it a contender for the stiff table?

torchdiffeq 0.2.5's only implicit method, `implicit_adams`, runs on a fixed grid and solves
its corrector by functional (fixed-point) iteration, which converges only when
step_size x ||df/dy|| < 1. Robertson's Jacobian reaches ~1e4, so this probes it on [0, 1]
(not the stiff table's [0, 1e5]) at shrinking step sizes against scipy Radau at rtol 1e-12.

    .venv/bin/python benchmarks/torchdiffeq_implicit_probe.py
"""

from __future__ import annotations

import time
import warnings

import torch
import torchdiffeq
from scipy.integrate import solve_ivp


def robertson(t, y):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
                        3e7 * y2**2], -1)


def main() -> None:
    torch.set_num_threads(1)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    reference = solve_ivp(lambda t, y: robertson(t, torch.from_numpy(y)).numpy(), (0.0, 1.0),
                          y0.numpy(), method="Radau", rtol=1e-12, atol=1e-14).y[:, -1]
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for step_size in (1e-1, 1e-2, 1e-3, 1e-4):
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1 = torchdiffeq.odeint(robertson, y0, times, method="implicit_adams",
                                    options={"step_size": step_size})[-1]
        error = float((y1 - torch.from_numpy(reference)).abs().max())
        print(f"implicit_adams step_size {step_size:g}: {time.perf_counter() - started:.2f} s, "
              f"max error {error:.3g}, {len(caught)} non-convergence warnings", flush=True)


if __name__ == "__main__":
    main()
