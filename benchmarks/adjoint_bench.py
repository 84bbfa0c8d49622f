"""Neural-ODE gradients side by side: equilibria's continuous adjoint vs torchdiffeq 0.2.5.

Problem: the ODE benchmark's field f(y) = W2 tanh(W1 y + b1) + b2 (state 64, width 512),
batch 256, float32, t in [0, 1], rtol 1e-5, atol 1e-7 forwards and backwards, loss
L = sum(w * y(1)) with fixed random w. One training step = forward solve + backward pass.

For each method: f calls in the forward and in the backward (batch calls: a VJP counts as
one), wall time of forward + backward (median of repeats, contenders interleaved), and the
error of dL/d(y0, W1, b1, W2, b2) against a float64 reference (our Backprop at rtol 1e-10),
as the relative 2-norm error over all gradients.

- "seminorm": the backward step test leaves out the parameter integrals (Kidger, Chen &
  Lyons, ICML 2021); equilibria's Adjoint() default, torchdiffeq's
  adjoint_options=dict(norm="seminorm").
- Backprop rows (autograd through the solver's steps) are the memory-hungry reference.

Run: .venv/bin/python benchmarks/adjoint_bench.py [--repeats 5] [--threads 1]
Writes benchmarks/results/adjoint.md and prints it.
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
from equilibria.ode import Adjoint, odeint, odeint_adjoint

sys.path.insert(0, str(Path(__file__).parent))
from ode_bench import ATOL, BATCH, DIM, MLP, RTOL, T_SPAN  # noqa: E402

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - reported in the table
    torchdiffeq = None

RESULTS = Path(__file__).parent / "results" / "adjoint.md"


class CountedField(torch.nn.Module):
    """f(t, y) = mlp(y), counting batch calls (forward evaluations and VJPs alike)."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.mlp = mlp
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.mlp(y)


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    y0 = torch.randn(BATCH, DIM, generator=generator)
    weights = torch.randn(BATCH, DIM, generator=generator)
    return y0.to(dtype), weights.to(dtype)


def reference_gradients(mlp: MLP) -> list[torch.Tensor]:
    mlp64 = MLP().double()
    mlp64.load_state_dict({k: v.double() for k, v in mlp.state_dict().items()})
    y0, weights = _inputs(torch.float64)
    y0.requires_grad_(True)
    sol = odeint(lambda t, y: mlp64(y), y0, T_SPAN, solver=eq.Dopri5(), rtol=1e-10, atol=1e-12)
    return list(torch.autograd.grad((sol.value * weights).sum(), [y0, *mlp64.parameters()]))


def contenders(mlp: MLP) -> list[tuple[str, CountedField, callable]]:
    """(name, counted field, step() -> (forward calls, grads)) for each method."""
    y0_base, weights = _inputs()
    entries = []

    def ours(name, gradient):
        field = CountedField(mlp)

        def step():
            y0 = y0_base.clone().requires_grad_(True)
            field.calls = 0
            if gradient is None:
                sol = odeint(field, y0, T_SPAN, solver=eq.Dopri5(), rtol=RTOL, atol=ATOL)
            else:
                sol = odeint_adjoint(field, y0, T_SPAN, solver=eq.Dopri5(), rtol=RTOL,
                                     atol=ATOL, gradient=gradient)
            forward = field.calls
            grads = torch.autograd.grad((sol.value * weights).sum(), [y0, *mlp.parameters()])
            return forward, grads

        entries.append((name, field, step))

    ours("equilibria Adjoint(seminorm=True) (default)", Adjoint())
    ours("equilibria Adjoint(seminorm=False)", Adjoint(seminorm=False))
    ours("equilibria Backprop", None)
    if torchdiffeq is not None:
        t = torch.tensor(T_SPAN)

        def theirs(name, adjoint, options=None):
            field = CountedField(mlp)

            def step():
                y0 = y0_base.clone().requires_grad_(True)
                field.calls = 0
                if adjoint:
                    y = torchdiffeq.odeint_adjoint(field, y0, t, method="dopri5", rtol=RTOL,
                                                   atol=ATOL, adjoint_options=options)[-1]
                else:
                    y = torchdiffeq.odeint(field, y0, t, method="dopri5", rtol=RTOL,
                                           atol=ATOL)[-1]
                forward = field.calls
                grads = torch.autograd.grad((y * weights).sum(), [y0, *mlp.parameters()])
                return forward, grads

            entries.append((name, field, step))

        theirs("torchdiffeq odeint_adjoint (seminorm)", True, {"norm": "seminorm"})
        theirs("torchdiffeq odeint_adjoint", True)
        theirs("torchdiffeq odeint (backprop)", False)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mlp = MLP()
    reference = reference_gradients(mlp)
    entries = contenders(mlp)
    results = {name: step() for name, _, step in entries}  # warm-up, and the counts
    counts = {}
    for name, field, _step in entries:
        forward, _ = results[name]
        counts[name] = (forward, field.calls - forward)
    times = {name: [] for name, _, _ in entries}
    for _ in range(args.repeats):
        for name, _, step in entries:
            start = time.perf_counter()
            results[name] = step()
            times[name].append(time.perf_counter() - start)
    lines = [
        "# Neural-ODE gradients: equilibria's adjoint vs torchdiffeq",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, torchdiffeq "
        f"{getattr(torchdiffeq, '__version__', 'missing') if torchdiffeq else 'missing'}, "
        f"Python {platform.python_version()}, threads {torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)",
        f"- command: `.venv/bin/python {' '.join(sys.argv)}`",
        f"- field: tanh MLP {DIM} -> 512 -> {DIM}, batch {BATCH}, float32, t in {list(T_SPAN)}, "
        f"Dopri5, rtol {RTOL}, atol {ATOL} forwards and backwards; loss sum(w * y(1))",
        "- f calls are batch calls (a VJP is one call); wall = forward + backward, median of "
        f"{args.repeats}, contenders interleaved; grad error: relative 2-norm error of all "
        "gradients against a float64 Backprop reference at rtol 1e-10",
        "",
        "| method | f calls forward | f calls backward | wall ms | grad error | wall / ours |",
        "|---|---|---|---|---|---|",
    ]
    ours_wall = statistics.median(times[entries[0][0]])
    for name, _, _ in entries:
        _, grads = results[name]
        error = torch.sqrt(
            sum(((g.double() - r) ** 2).sum() for g, r in zip(grads, reference))
            / sum((r**2).sum() for r in reference)
        )
        wall = statistics.median(times[name])
        forward, backward = counts[name]
        lines.append(
            f"| {name} | {forward} | {backward} | {wall * 1e3:.0f} | {float(error):.1e} | "
            f"{wall / ours_wall:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
