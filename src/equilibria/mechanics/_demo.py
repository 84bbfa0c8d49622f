"""The mechanics demo: rings through 2-D and augmented neural ODEs, H(t) along the adjoint.

`run(out_dir, quick)` trains three classifiers on the concentric rings (a disc of class 0
inside a ring of class 1): a 2-D neural ODE, the same with the state zero-padded to 3-D
(Dupont et al., "Augmented Neural ODEs", 2019) and a discrete MLP; each ODE model is
flow -> linear read-out. It draws the learned flows and decision regions, the Hamiltonian
H(t) = p·F along the adjoint of the trained fields (constant: they are autonomous), and the
first-order convergence of a stepped network to its ODE.

What topology does and does not forbid. A 2-D flow φ is a homeomorphism isotopic to the
identity, so the image of every circle C of the ring still winds around the image of every
disc point d, and a linear read-out ℓ then satisfies min_C ℓ(φ(c)) <= ℓ(φ(d)): no threshold
separates the *continuum* of ring and disc. `separation_gap` measures it: max over disc
points of the logit minus min over dense ring circles, >= 0 for any 2-D flow, < 0 when the
classes are separated. On a finite sample, though, the flow can pull a thin radial strip of
the ring through the gap between disc and read-out line and reach high *sample* accuracy;
the demo reports that accuracy as measured, and the misclassified ring points are that strip.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from mpl_toolkits import mplot3d  # noqa: F401  (registers the 3-D projection)

from ..data.rings import make_rings
from ..nn.neural_ode import NeuralODE
from ..ode import Backprop, Tsit5, odeint
from ._conservation import hamiltonian_drift
from ._costate import costate
from ._feedforward import LayerODE, LayerStack, ode_likeness, ode_to_layers
from ._liouville import liouville

__all__ = ["RingsConfig", "run", "separation_gap", "train_rings_model"]

INNER_RADIUS = 1.0
RING_RADII = (1.5, 2.0)
HAMILTON_RTOL = 1e-8


@dataclass(frozen=True)
class RingsConfig:
    """Sizes of the rings experiment (quick mode: seconds on a CPU)."""

    n_train: int = 384
    n_test: int = 2000
    train_steps: int = 250
    hidden: int = 32
    flow_rtol: float = 1e-3
    learning_rate: float = 1e-2
    seed: int = 0


class _Field(torch.nn.Module):
    """Autonomous tanh MLP vector field F(x) (so H = p·F is conserved along the adjoint)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, dim),
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FlowClassifier(torch.nn.Module):
    """x -> [x, 0] (augment zeros) -> flow of dz/dt = F(z) over [0, 1] -> linear logit.

    The flow is an equilibria NeuralODE (Tsit5, per-sample adaptive steps at flow_rtol) with
    Backprop gradients: for these tiny fields autograd through the ~20 accepted steps was
    6x faster than the continuous adjoint (measured), and it is the gradient of the map used.
    """

    def __init__(self, augment: int, hidden: int, flow_rtol: float = 1e-3) -> None:
        super().__init__()
        self.augment = augment
        self.field = _Field(2 + augment, hidden)
        self.head = torch.nn.Linear(2 + augment, 1)
        self.flow = NeuralODE(
            self.field, solver=Tsit5(), gradient=Backprop(), rtol=flow_rtol, atol=flow_rtol / 100
        )

    def features(self, x: torch.Tensor, t_eval: list[float] | None = None) -> torch.Tensor:
        """z(1) (batch, 2 + augment), or z at t_eval (len(t_eval), batch, 2 + augment)."""
        z = torch.cat([x, x.new_zeros(x.shape[0], self.augment)], dim=1)
        if t_eval is None:
            return self.flow(z)
        flow = self.flow
        return odeint(self.field, z, (0.0, 1.0), solver=flow.solver, rtol=flow.rtol,
                      atol=flow.atol, t_eval=t_eval).value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


class _MLP(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def train_rings_model(kind: str, config: RingsConfig) -> tuple[torch.nn.Module, dict]:
    """Train one model on the rings; kind is "node_2d", "node_3d" or "mlp".

    Returns:
        (model, metrics) with metrics: test accuracy, final train loss, seconds.
    """
    torch.manual_seed(config.seed)
    if kind == "node_2d":
        model: torch.nn.Module = FlowClassifier(0, config.hidden, config.flow_rtol)
    elif kind == "node_3d":
        model = FlowClassifier(1, config.hidden, config.flow_rtol)
    elif kind == "mlp":
        model = _MLP(config.hidden)
    else:
        raise ValueError(f"kind must be 'node_2d', 'node_3d' or 'mlp', got {kind!r}.")
    x, y = make_rings(
        config.n_train, inner_radius=INNER_RADIUS, ring_radii=RING_RADII, seed=config.seed
    )
    x_test, y_test = make_rings(
        config.n_test, inner_radius=INNER_RADIUS, ring_radii=RING_RADII, seed=config.seed + 1
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    start = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(config.train_steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float(((model(x_test) > 0).long() == y_test).double().mean())
    return model, {"accuracy": accuracy, "train_loss": loss.item(), "seconds": seconds}


def separation_gap(model: torch.nn.Module, n_angles: int = 2048, n_circles: int = 6) -> float:
    """max logit over disc points − min logit over dense circles of the ring.

    >= 0 means no threshold separates the continuum (always so for a 2-D flow with a linear
    read-out, see the module docstring); < 0 means the classes are separated by a margin.
    The disc is probed on a polar grid, the ring on n_circles circles of n_angles points.
    """
    angles = torch.linspace(0, 2 * math.pi, n_angles + 1)[:-1]
    circle = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    ring = torch.cat([r * circle for r in torch.linspace(*RING_RADII, n_circles).tolist()])
    disc_radii = torch.linspace(0, INNER_RADIUS, 16).tolist()
    disc = torch.cat([r * circle[::8] for r in disc_radii])
    with torch.no_grad():
        return float(model(disc).max() - model(ring).min())


def _hamiltonian_along_adjoint(model: FlowClassifier, n_points: int) -> dict:
    """H(t) for test points along the costate of the trained field (float64 copy)."""
    field = copy.deepcopy(model.field).double()
    head = copy.deepcopy(model.head).double()
    x, y = make_rings(n_points, inner_radius=INNER_RADIUS, ring_radii=RING_RADII, seed=7)
    z0 = torch.cat([x.double(), x.new_zeros(n_points, model.augment).double()], dim=1)
    labels = y.double()

    def loss_fn(z: torch.Tensor) -> torch.Tensor:
        logits = head(z).squeeze(1)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none"
        )

    cs = costate(field, z0, (0.0, 1.0), loss_fn=loss_fn, solver=Tsit5(), rtol=HAMILTON_RTOL,
                 atol=HAMILTON_RTOL * 1e-3)
    drift = hamiltonian_drift(field, cs)
    return {"t": cs.t, "H": drift.values, "relative_drift": drift.relative_drift}


def _phase_volume(model: FlowClassifier, n_points: int) -> dict:
    """Liouville on the trained field (float64 copy): the log-volume change of the flow at
    test points three ways (trace integral, variational equation, costate rows)."""
    field = copy.deepcopy(model.field).double()
    x, _ = make_rings(n_points, inner_radius=INNER_RADIUS, ring_radii=RING_RADII, seed=8)
    z0 = torch.cat([x.double(), x.new_zeros(n_points, model.augment).double()], dim=1)
    volume = liouville(field, z0, (0.0, 1.0), rtol=HAMILTON_RTOL, atol=HAMILTON_RTOL * 1e-3)
    log_volume = volume.log_volume[-1]
    return {
        "max_gap": float(volume.gap.max()),
        "log_volume_min": float(log_volume.min()),
        "log_volume_max": float(log_volume.max()),
    }


def _feedforward_gap(depths: list[int]) -> tuple[list[float], float, list[float], list[float]]:
    """Gap between L-layer nets and the ODE dx/dt = (A + sin(2πt)B)x + cos(t)c − x³/2."""
    gen = torch.Generator().manual_seed(0)
    a, b = (0.35 * torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    c = torch.randn(3, generator=gen, dtype=torch.float64)
    ode = LayerODE(
        w=lambda t: a + torch.sin(2 * math.pi * t).to(a)[:, None, None] * b,
        b=lambda t: torch.cos(t).to(c)[:, None] * c,
        g=lambda x: -0.5 * x**3,
    )
    x0 = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    reference = odeint(ode, x0, (0.0, 1.0), rtol=1e-11, atol=1e-13).value
    gaps = [float((ode_to_layers(ode, n)(x0) - reference).abs().max()) for n in depths]
    order = float(-np.polyfit(np.log(depths), np.log(gaps), 1)[0])
    scores = [ode_likeness(ode_to_layers(ode, n)).weight_score for n in depths]
    # A generic deep net for contrast: W_l = I + 0.3 N(0, 1/d) whatever the depth.
    generic = [
        ode_likeness(
            LayerStack(
                torch.eye(3, dtype=torch.float64)
                + 0.3 * torch.randn(n, 3, 3, generator=gen, dtype=torch.float64) / math.sqrt(3),
                torch.zeros(n, 3, dtype=torch.float64),
                torch.tanh,
            )
        ).weight_score
        for n in depths
    ]
    return gaps, order, scores, generic


def _decision_panel(ax, model, title: str, x_test, y_test) -> None:
    grid = torch.linspace(-2.5, 2.5, 161)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    with torch.no_grad():
        logits = model(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)).reshape(xx.shape)
    ax.contourf(xx, yy, (logits > 0).float(), levels=[-0.5, 0.5, 1.5], colors=["#cde", "#fdc"])
    ax.contour(xx, yy, logits, levels=[0.0], colors="k", linewidths=0.8)
    _scatter(ax, x_test[:600], y_test[:600])
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")


def _scatter(ax, points, labels, **kw) -> None:
    colors = np.where(labels.numpy() == 0, "tab:blue", "tab:red")
    ax.scatter(points[:, 0], points[:, 1], c=colors, s=3, **kw)


def run(out_dir: pathlib.Path, quick: bool) -> dict:
    """Train the three rings classifiers and draw the mechanics figures into out_dir.

    Arguments:
        out_dir: folder for the PNGs and mechanics.json (created if missing).
        quick: 384 points, 250 Adam steps (about 30 s of CPU) instead of the full run
            (1000 points, 600 steps, about 5x longer).

    Returns:
        dict (JSON-serialisable): "figures" {name: path}, "accuracy" {model: test accuracy},
        "separation_gap" {model: gap}, "hamiltonian_relative_drift" {model: max over
        samples}, "feedforward" {depths, gaps, order, weight_scores}, "seconds".
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The models are tiny (a few thousand flops a layer): intra-op threads only add overhead,
    # and on a shared CPU oversubscription made training ~40x slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: pathlib.Path, quick: bool) -> dict:
    start = time.perf_counter()
    config = RingsConfig() if quick else RingsConfig(n_train=1000, train_steps=600)
    models, accuracy, gaps, train_seconds = {}, {}, {}, {}
    for kind in ("node_2d", "node_3d", "mlp"):
        model, metrics = train_rings_model(kind, config)
        models[kind] = model
        accuracy[kind] = metrics["accuracy"]
        train_seconds[kind] = metrics["seconds"]
        gaps[kind] = separation_gap(model)
    hamilton = {k: _hamiltonian_along_adjoint(models[k], 32 if quick else 128) for k in
                ("node_2d", "node_3d")}
    volume = {k: _phase_volume(models[k], 16 if quick else 64) for k in ("node_2d", "node_3d")}
    depths = [40, 80, 160, 320, 640]
    ff_gaps, ff_order, ff_scores, ff_generic = _feedforward_gap(depths)

    x_test, y_test = make_rings(
        config.n_test, inner_radius=INNER_RADIUS, ring_radii=RING_RADII, seed=config.seed + 1
    )
    figures = {
        "features": _figure_features(models, x_test, y_test, out_dir / "rings_features.png"),
        "decision": _figure_decision(models, accuracy, gaps, x_test, y_test,
                                     out_dir / "rings_decision.png"),
        "hamiltonian": _figure_hamiltonian(hamilton, out_dir / "hamiltonian.png"),
        "feedforward": _figure_feedforward(depths, ff_gaps, ff_order, ff_scores, ff_generic,
                                           out_dir / "feedforward_gap.png"),
    }
    result = {
        "figures": {k: str(v) for k, v in figures.items()},
        "accuracy": accuracy,
        "separation_gap": gaps,
        "hamiltonian_relative_drift": {
            k: float(v["relative_drift"].max()) for k, v in hamilton.items()
        },
        "liouville": volume,
        "feedforward": {"depths": depths, "gaps": ff_gaps, "order": ff_order,
                        "weight_scores": ff_scores, "generic_weight_scores": ff_generic},
        "train_seconds": train_seconds,
        "quick": quick,
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "mechanics.json").write_text(json.dumps(result, indent=2))
    return result


def _figure_features(models, x_test, y_test, path: pathlib.Path) -> pathlib.Path:
    fig = Figure(figsize=(13, 4.2))
    ax = fig.add_subplot(1, 3, 1)
    _scatter(ax, x_test, y_test)
    ax.set_title("concentric rings (test set)", fontsize=9)
    ax.set_aspect("equal")
    ax = fig.add_subplot(1, 3, 2)
    sample = slice(0, 300)
    times = torch.linspace(0, 1, 21).tolist()
    with torch.no_grad():
        path2d = models["node_2d"].features(x_test[sample], t_eval=times)
    colors = np.where(y_test[sample].numpy() == 0, "tab:blue", "tab:red")
    for i in range(path2d.shape[1]):
        ax.plot(path2d[:, i, 0], path2d[:, i, 1], color=colors[i], lw=0.3, alpha=0.4)
    _scatter(ax, path2d[-1], y_test[sample])
    ax.set_title("2-D neural ODE: trajectories x(t), t in [0, 1]", fontsize=9)
    ax = fig.add_subplot(1, 3, 3, projection="3d")
    with torch.no_grad():
        feats = models["node_3d"].features(x_test[:600])
    colors = np.where(y_test[:600].numpy() == 0, "tab:blue", "tab:red")
    ax.scatter(feats[:, 0], feats[:, 1], feats[:, 2], c=colors, s=3)
    ax.set_title("augmented (3-D) neural ODE: features x(1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _figure_decision(models, accuracy, gaps, x_test, y_test, path) -> pathlib.Path:
    fig = Figure(figsize=(13, 4.4))
    names = {"node_2d": "2-D neural ODE", "node_3d": "augmented 3-D neural ODE",
             "mlp": "discrete MLP"}
    for i, kind in enumerate(("node_2d", "node_3d", "mlp")):
        ax = fig.add_subplot(1, 3, i + 1)
        title = f"{names[kind]}: test acc {accuracy[kind]:.3f}\nseparation gap {gaps[kind]:+.2f}"
        _decision_panel(ax, models[kind], title, x_test, y_test)
    fig.suptitle("separation gap = max logit on the disc − min logit on dense ring circles: "
                 ">= 0 for every 2-D flow (topology), < 0 when the continuum is separated",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _figure_hamiltonian(hamilton, path) -> pathlib.Path:
    fig = Figure(figsize=(11, 4))
    for i, (kind, data) in enumerate(hamilton.items()):
        ax = fig.add_subplot(1, 2, i + 1)
        values = data["H"].numpy()
        ax.plot(data["t"].numpy(), values, lw=0.8)
        worst = float(data["relative_drift"].max())
        ax.set_title(f"{kind}: H(t) = p·F along the adjoint\nmax relative drift {worst:.1e}"
                     f" (rtol {HAMILTON_RTOL:.0e})", fontsize=9)
        ax.set_xlabel("t")
        ax.set_ylabel("H")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _figure_feedforward(depths, gaps, order, scores, generic, path) -> pathlib.Path:
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.loglog(depths, gaps, "o-", label=f"network vs ODE, fitted order {order:.2f}")
    ax.loglog(depths, [gaps[0] * depths[0] / n for n in depths], "k--", lw=0.8, label="1/L")
    ax.set_xlabel("layers L")
    ax.set_ylabel("max |x_L − x(T)|")
    ax.legend(fontsize=8)
    ax.set_title("x_{l+1} = h(W_l x_l + B_l) steps dx/dt = w(t)x + b(t) + g(x)", fontsize=9)
    ax = fig.add_subplot(1, 2, 2)
    ax.loglog(depths, scores, "o-", label="stepped ODE (W_l = I + Δt w(t_l))")
    ax.loglog(depths, generic, "s-", label="generic net (W_l = I + 0.3 N(0, 1/d))")
    ax.set_xlabel("layers L")
    ax.set_ylabel("L · max ||W_l − I||")
    ax.legend(fontsize=8)
    ax.set_title("ODE-likeness: bounded as L grows only for ODE-like nets", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
