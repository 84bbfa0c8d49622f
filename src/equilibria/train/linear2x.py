"""The seed's first demonstration: learn y = 2x with a linear DEQ solved as an ODE steady state.

f(z, x) = Linear(5, 1)(Linear(1, 5)(z + x)); the equilibrium is the steady state of
dz/dt = f(z, x) - z, integrated with Tsit5 (`SteadyState(Tsit5())`); x = 1..10, y = 2x;
Adam(lr = 0.05), full batch, 1000 epochs; then deq(-5) should be -10 (extrapolation).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.linear2x import linear2x_data
from ..models.linear2x import Linear2xDEQ
from .solvers import make_deq

__all__ = ["train_linear2x"]


def train_linear2x(
    out_dir: str | Path | None = None,
    epochs: int = 1000,
    lr: float = 0.05,
    seed: int = 0,
    atol: float = 1e-6,
    rtol: float = 1e-6,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the y = 2x DEQ; return deq(-5), the final loss and the figure paths.

    Arguments:
        out_dir: where the two PNGs go (None: no figures).
        epochs, lr, seed: the seed's 1000, 0.05 and a fixed seed.
        atol, rtol: the steady-state test for the forward and implicit backward solves.

    Returns:
        dict with deq_at_minus_5, loss, epochs, seconds, a (the learned slope w2 . w1),
        forward_nfe (last epoch, mean per sample) and the figure paths.

    Raises:
        FloatingPointError: the loss became NaN/inf (the message says what to change).
    """
    import time

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = Linear2xDEQ(make_deq("steady-state-tsit5", "implicit", atol, rtol, max_steps=1000))
    x, y = linear2x_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    started = time.perf_counter()
    loss_value = math.nan
    for epoch in range(epochs):
        loss = torch.mean((model(x) - y) ** 2)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"linear2x: the loss became {loss_value} at epoch {epoch + 1}; the linear map "
                "left the stable region (slope >= 1). Lower --lr or change --seed."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if epoch % 200 == 0 or epoch == epochs - 1:
            log(f"epoch {epoch + 1:4d}/{epochs}: loss {loss_value:.3e}")
    seconds = time.perf_counter() - started
    with torch.no_grad():
        at_minus_5 = float(model(torch.tensor([[-5.0]]))[0, 0])
        nfe = float(model.deq.last_solution.stats["nfe"].float().mean())
        slope = float(model.cell.outer.weight @ model.cell.inner.weight)
    log(f"deq(-5) = {at_minus_5:.5f} (truth -10); learned slope a = {slope:.5f} (2/3 exact)")
    result = {
        "deq_at_minus_5": at_minus_5,
        "loss": loss_value,
        "epochs": epochs,
        "seconds": seconds,
        "a": slope,
        "forward_nfe": nfe,
    }
    if out_dir is not None:
        result.update(_figures(model, x, y, at_minus_5, Path(out_dir)))
    return result


def _figures(model: Linear2xDEQ, x, y, at_minus_5: float, out_dir: Path) -> dict:
    import equilibria as eq

    from .. import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    grid = torch.linspace(-6, 11, 69).unsqueeze(1)
    with torch.no_grad():
        predicted = model(grid)[:, 0].tolist()
        starts = torch.tensor([[-5.0], [1.0], [5.0], [10.0]])
        times = torch.linspace(0, 20, 201)
        solution = eq.odeint(
            model.vector_field,
            torch.zeros_like(starts),
            t_span=(0.0, 20.0),
            solver=eq.Tsit5(),
            rtol=1e-7,
            atol=1e-9,
            t_eval=times,
            args=(starts,),
        )
    curves = solution.value[:, :, 0].tolist()
    fit = plots.linear2x_fit(
        x[:, 0].tolist(),
        y[:, 0].tolist(),
        grid[:, 0].tolist(),
        predicted,
        -5.0,
        at_minus_5,
        out_dir / "linear2x_fit.png",
    )
    path = plots.trajectory(
        times.tolist(),
        curves,
        [f"x = {v:g}" for v in starts[:, 0].tolist()],
        out_dir / "linear2x_trajectory.png",
    )
    return {"fit_png": str(fit), "trajectory_png": str(path)}
