"""Matplotlib figures for the demos and training runs, written as PNG files.

Each function takes plain data (lists, tensors) and a path, draws one figure with the Agg
backend (no display needed) and returns the path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = [
    "cobweb",
    "digit_grid",
    "linear2x_fit",
    "nfe_per_epoch",
    "residual_histogram",
    "trajectory",
    "training_curves",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def cobweb(
    fn: Callable[[float], float],
    iterates: Sequence[float],
    path: str | Path,
    fixed_point: float | None = None,
) -> Path:
    """Cobweb diagram of x <- fn(x): the curve y = fn(x), the 45-degree line, the staircase.

    Arguments:
        fn: the scalar map (e.g. math.cos).
        iterates: x0, x1 = fn(x0), x2, ... (the ones drawn; the last is not the fixed point
            unless they converged).
        fixed_point: x* = fn(x*) when known: marked and named in the title. Without it the
            title names the last iterate drawn as what it is.
    """
    plt = _pyplot()
    lo = min(min(iterates), min(fn(x) for x in iterates)) - 0.2
    hi = max(max(iterates), max(fn(x) for x in iterates)) + 0.2
    grid = [lo + (hi - lo) * (k / 400) for k in range(401)]  # (no overflow near 1e308)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot(grid, [fn(x) for x in grid], label="y = f(x)")
    ax.plot(grid, grid, "k--", lw=1, label="y = x (45°)")
    xs, ys = [iterates[0]], [0.0 if lo < 0 < hi else lo]
    for current, following in zip(iterates[:-1], iterates[1:]):
        xs += [current, following]
        ys += [following, following]
    ax.plot(xs, ys, color="tab:red", lw=1, label="iterates")
    ax.set(xlabel="x", ylabel="f(x)", xlim=(lo, hi), ylim=(lo, hi))
    if fixed_point is None:
        ax.plot(iterates[-1], iterates[-1], "o", color="tab:red")
        ax.set_title(f"cobweb: x{len(iterates) - 1} = {iterates[-1]:.6f}")
    else:
        ax.plot(fixed_point, fixed_point, "o", color="black", label="fixed point")
        ax.set_title(f"cobweb: fixed point x* = {fixed_point:.6f}")
    ax.legend(loc="lower right")
    return _save(fig, path)


def training_curves(metrics: list[dict], steps: list[dict], path: str | Path) -> Path:
    """Loss (per logged step and per epoch) and train/test accuracy per epoch."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        per_epoch = max(s["batch"] for s in steps) or 1
        x = [s["epoch"] - 1 + s["batch"] / per_epoch for s in steps]
        left.plot(x, [s["loss"] for s in steps], lw=0.8, alpha=0.7, label="batch loss")
    if metrics:
        epochs = [m["epoch"] for m in metrics]
        left.plot(epochs, [m["loss"] for m in metrics], "o-", label="epoch mean (train)")
        left.plot(epochs, [m["test_loss"] for m in metrics], "s-", label="test")
        right.plot(epochs, [m["train_accuracy"] for m in metrics], "o-", label="train")
        right.plot(epochs, [m["test_accuracy"] for m in metrics], "s-", label="test")
    left.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    left.legend()
    right.legend()
    return _save(fig, path)


def nfe_per_epoch(metrics: list[dict], path: str | Path) -> Path:
    """Mean forward and backward function evaluations per sample, per epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [m["epoch"] for m in metrics]
    ax.plot(epochs, [m["forward_nfe_mean"] for m in metrics], "o-", label="forward (train)")
    backward = [m["backward_nfe_mean"] for m in metrics]
    if any(not math.isnan(b) for b in backward):
        ax.plot(epochs, backward, "s-", label="backward (train)")
    ax.plot(epochs, [m["test_forward_nfe_mean"] for m in metrics], "^-", label="forward (test)")
    ax.set(xlabel="epoch", ylabel="NFE per sample", title="solver cost")
    ax.legend()
    return _save(fig, path)


def residual_histogram(residuals: torch.Tensor, path: str | Path, atol: float | None = None):
    """Histogram (log x) of the per-sample forward residuals ||f(z*, x) - z*||_rms."""
    plt = _pyplot()
    values = residuals.detach().double().cpu().clamp_min(1e-16)
    fig, ax = plt.subplots(figsize=(6, 4))
    if values.numel():
        lo, hi = math.log10(float(values.min())), math.log10(float(values.max()))
        bins = [10 ** (lo + (hi - lo + 1e-9) * k / 40) for k in range(41)]
        ax.hist(values.numpy(), bins=bins)
    if atol is not None:
        # the per-sample test is residual <= atol + rtol * RMS(z): atol is its floor
        ax.axvline(atol, color="k", ls="--", lw=1, label=f"atol = {atol:g} (+ rtol·RMS(z))")
        ax.legend()
    ax.set(xscale="log", xlabel="residual at z* (RMS)", ylabel="test samples")
    ax.set_title("forward residual distribution")
    return _save(fig, path)


def digit_grid(images, labels, predictions, path: str | Path) -> Path:
    """A grid of test digits titled 'pred (true)', wrong ones in red."""
    plt = _pyplot()
    count = images.shape[0]
    columns = min(8, max(count, 1))
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.6 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        ax.imshow(images[k].cpu().numpy(), cmap="gray_r")
        right = int(predictions[k]) == int(labels[k])
        ax.set_title(
            f"{int(predictions[k])} ({int(labels[k])})",
            color="black" if right else "tab:red",
            fontsize=9,
        )
    fig.suptitle("predicted (true)")
    return _save(fig, path)


def linear2x_fit(x_train, y_train, x_grid, y_grid, x_extra, y_extra, path: str | Path) -> Path:
    """Prediction vs truth for the y = 2x demo, with the extrapolated point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(x_grid, [2 * v for v in x_grid], "k--", lw=1, label="truth y = 2x")
    ax.plot(x_grid, y_grid, label="DEQ prediction")
    ax.plot(x_train, y_train, "o", label="training points")
    ax.plot([x_extra], [y_extra], "r*", ms=12, label=f"deq({x_extra:g}) = {y_extra:.4f}")
    ax.set(xlabel="x", ylabel="y", title="y = 2x learned as an ODE steady state")
    ax.legend()
    return _save(fig, path)


def trajectory(times, values, labels: Sequence[str], path: str | Path) -> Path:
    """z(t) curves (one per sample) converging to their steady states."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k, label in enumerate(labels):
        ax.plot(times, [row[k] for row in values], label=label)
    ax.set(xlabel="t", ylabel="z(t)", title="dz/dt = f(z + x) - z to its steady state")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)
