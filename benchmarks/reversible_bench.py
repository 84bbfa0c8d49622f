"""Reversible DEQ benchmark: rounding drift of the rebuilt iterates, and training vs Implicit.

Part 1 — drift (float32). The seed MNIST cell (models/mnist.py, default init; x = a random
Linear(784, 100) embedding of 64 real test images, z0 = 0) is iterated N coupled steps
(tolerances nobody reaches), then the pairs are rebuilt backwards. Reported per (beta,
configuration, N): the reconstruction_error stat (largest RMS error of a rebuilt pair against
a stored one, before any recompute, relative to RMS(x)), and the relative error of the
parameter gradient of L = Σ c·z against the same iteration in float64 with every pair
stored. Configurations: the defences (float64 pair, checkpoints every k = 13 steps at beta
0.5 / 5 at 0.8, recomputing drifted segments) off and on; "every pair stored" is the floor
set by the float32 forward itself.

Memory: the distinct storages autograd saves for backward during one forward
(saved_tensors_hooks), less f's parameters (alive anyway), per sample, after N forced steps.

Part 2 — training. The seed MNIST DEQ trained with Anderson + Implicit(GMRES) (the
library's fast path, as in benchmarks/torchdeq_mnist.py) and with Reversible, from the same
initial weights, on the same batches in the same order, Adam(1e-3), batch 128, atol = rtol =
1e-3, on a subset of real MNIST. Contenders alternate batch by batch (and which one goes first
alternates), so a shared machine's load hits them alike. Reported: time per training step
(forward + backward + Adam), forward / backward NFE per sample, test accuracy, and the
memory saved for backward (as above) by one forward of the trained model.

Run:  .venv/bin/python benchmarks/reversible_bench.py            (writes results/reversible.md)
      .venv/bin/python benchmarks/reversible_bench.py --quick    (smaller, not written)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import equilibria as eq
from equilibria.data import load_mnist, normalize_images
from equilibria.models.mnist import SeedCell, SeedMnistDEQ

RESULTS = Path(__file__).parent / "results" / "reversible.md"
INF = float("inf")
DRIFT_CONFIGS = {
    "the paper's scheme: float32 pair, no checkpoints, no recompute":
        {"pair_dtype": None, "checkpoint_every": None, "rebuild_tolerance": INF},
    "float64 pair, no checkpoints, no recompute":
        {"checkpoint_every": None, "rebuild_tolerance": INF},
    "float64 pair, auto checkpoints, no recompute": {"rebuild_tolerance": INF},
    "float32 pair, no checkpoints, recompute drifted segments":
        {"pair_dtype": None, "checkpoint_every": None},
    "default: float64 pair, auto checkpoints, recompute drifted segments": {},
    "float32, every pair stored (checkpoint_every=1)":
        {"pair_dtype": None, "checkpoint_every": 1},
}


def _drift_problem(seed: int = 0):
    torch.manual_seed(seed)
    cell = SeedCell(100, 500)
    embed = torch.nn.Linear(784, 100)
    images = normalize_images(load_mnist().test_images[:64])
    with torch.no_grad():
        x = embed(images.flatten(1))
    c = torch.randn(64, 100, generator=torch.Generator().manual_seed(seed))
    return cell, x, c


def _gradient(state, x, c, strategy, n_steps, dtype):
    """Parameter gradient of Σ c·z after n_steps forced steps, and the rebuild drift."""
    cell = SeedCell(100, 500).to(dtype)
    cell.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    deq = eq.DEQ(cell, backward=strategy, atol=1e-30, rtol=1e-30, max_steps=n_steps)
    z = deq(x.to(dtype))
    grads = torch.autograd.grad((c.to(dtype) * z).sum(), list(cell.parameters()))
    flat = torch.cat([g.reshape(-1) for g in grads]).double()
    return flat, float(deq.last_backward_stats["reconstruction_error"].max())


def drift_table(steps: list[int], betas: list[float]) -> list[str]:
    cell, x, c = _drift_problem()
    state = {k: v.detach().clone() for k, v in cell.state_dict().items()}
    scale = float(x.pow(2).mean().sqrt())
    lines = [
        "| beta | configuration | " + " | ".join(f"N={n}: drift / grad err" for n in steps)
        + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for beta in betas:
        references = {
            n: _gradient(state, x, c, eq.Reversible(beta, checkpoint_every=1), n,
                         torch.float64)[0]
            for n in steps
        }
        for name, options in DRIFT_CONFIGS.items():
            cells = []
            for n in steps:
                strategy = eq.Reversible(beta, **options)
                with warnings.catch_warnings():  # the drift warning: measured here instead
                    warnings.simplefilter("ignore")
                    grad, drift = _gradient(state, x, c, strategy, n, torch.float32)
                reference = references[n]
                error = float((grad - reference).norm() / reference.norm())
                cells.append(f"{drift / scale:.1e} / {error:.1e}")
            lines.append(f"| {beta} | {name} | " + " | ".join(cells) + " |")
        print("\n".join(lines[-len(DRIFT_CONFIGS):]), flush=True)
    return lines


def memory_table(steps: list[int]) -> list[str]:
    """Bytes autograd saves for backward during one forward of N forced steps."""
    cell, x, _ = _drift_problem()
    contenders = {
        "Implicit (Picard forward)": (eq.Implicit(), eq.Picard()),
        "Unrolled (Picard forward)": (eq.Unrolled(), eq.Picard()),
        "Reversible(0.8, checkpoint_every=None)": (eq.Reversible(checkpoint_every=None), None),
        "Reversible(0.8) (auto: a pair every 5 steps)": (eq.Reversible(), None),
    }
    lines = ["| contender | " + " | ".join(f"N={n}" for n in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name, (backward, solver) in contenders.items():
        cells = []
        for n in steps:
            deq = eq.DEQ(cell, solver=solver, backward=backward, atol=1e-30, rtol=1e-30,
                         max_steps=n)
            cells.append(f"{saved_bytes_per_sample(deq, x) / 1024:.1f} kB")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)
    return lines


def _model(backward, solver=None):
    def factory(cell):
        return eq.DEQ(cell, solver=solver, backward=backward, atol=1e-3, rtol=1e-3,
                      max_steps=100)

    return SeedMnistDEQ(factory)


def saved_bytes_per_sample(deq, x) -> float:
    """Memory autograd keeps for backward during deq(x): the distinct storages of the saved
    tensors, less f's parameters (alive anyway; the graph of f saves references to them,
    once a step for Unrolled)."""
    total = 0
    parameters = {p.untyped_storage().data_ptr() for p in deq.parameters()}
    seen: set[int] = set()

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters | seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forced steps do not converge
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            deq(x.detach().requires_grad_(True))
    return total / x.shape[0]


def training_table(subset: int, test_subset: int, epochs: int, betas: list[float]):
    data = load_mnist()
    train_x = normalize_images(data.train_images[:subset])
    train_y = data.train_labels[:subset]
    test_x = normalize_images(data.test_images[:test_subset])
    test_y = data.test_labels[:test_subset]
    contenders = {"Anderson + Implicit(GMRES)": (eq.Implicit(), eq.Anderson())}
    for beta in betas:
        contenders[f"Reversible(beta={beta})"] = (eq.Reversible(beta), None)
    # flat memory: no checkpoints, drifted trajectories recomputed in the backward
    contenders["Reversible(beta=0.8, checkpoint_every=None)"] = (
        eq.Reversible(0.8, checkpoint_every=None), None)
    models, optimizers = {}, {}
    for name, (backward, solver) in contenders.items():
        torch.manual_seed(0)  # identical initial weights
        models[name] = _model(backward, solver)
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=1e-3)
    times = {name: [] for name in models}
    forward_nfe = {name: [] for name in models}
    backward_nfe = {name: [] for name in models}
    drift = {name: 0.0 for name in models}
    recomputed = {name: [] for name in models}
    names = list(models)
    batch = 0
    for epoch in range(epochs):
        order = torch.randperm(subset, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, subset, 128):
            index = order[start: start + 128]
            images, labels = train_x[index], train_y[index]
            turn = names if batch % 2 == 0 else names[::-1]
            for name in turn:
                model, optimizer = models[name], optimizers[name]
                began = time.perf_counter()
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                times[name].append(time.perf_counter() - began)
                deq = model.deq
                forward_nfe[name].append(float(deq.last_solution.stats["nfe"].double().mean()))
                stats = deq.last_backward_stats
                backward_nfe[name].append(float(stats["nfe"].double().mean()))
                if "reconstruction_error" in stats:
                    drift[name] = max(drift[name], float(stats["reconstruction_error"].max()))
                    recomputed[name].append(float(stats["recomputed_steps"].double().mean()))
            batch += 1
        print(f"epoch {epoch + 1}: " + ", ".join(
            f"{name} {statistics.median(times[name]) * 1e3:.1f} ms" for name in names),
            flush=True)
    rows = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(test_x[i: i + 500]) for i in range(0, test_subset, 500)])
        accuracy = float((logits.argmax(1) == test_y).double().mean())
        model.train()
        with torch.no_grad():
            x = model.inject(train_x[:128])  # the embedding's own saved input is not the DEQ's
        memory = saved_bytes_per_sample(model.deq, x)
        rows[name] = {
            "median_ms": statistics.median(times[name]) * 1e3,
            "mean_ms": statistics.fmean(times[name]) * 1e3,
            "forward_nfe": statistics.fmean(forward_nfe[name]),
            "backward_nfe": statistics.fmean(backward_nfe[name]),
            "accuracy": accuracy,
            "saved_bytes": memory,
            "drift": drift[name],
            "recomputed": statistics.fmean(recomputed[name]) if recomputed[name] else 0.0,
        }
    base = rows[names[0]]
    lines = [
        "| contender | ms / step (median) | ratio vs Implicit | forward NFE / sample | "
        "backward NFE / sample | test accuracy | bytes saved for backward / sample | "
        "max rebuild drift | recomputed steps / sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['median_ms']:.1f} | {row['median_ms'] / base['median_ms']:.2f} | "
            f"{row['forward_nfe']:.1f} | {row['backward_nfe']:.1f} | {row['accuracy']:.4f} | "
            f"{row['saved_bytes']:.0f} | {row['drift']:.1e} | {row['recomputed']:.2f} |"
        )
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subset", type=int, default=12_800)
    parser.add_argument("--test-subset", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [5, 10, 20] if args.quick else [5, 10, 20, 40]
    betas = [0.5, 0.8]
    started = time.perf_counter()
    drift = drift_table(steps, betas)
    memory = memory_table(steps)
    subset = 1_280 if args.quick else args.subset
    test_subset = 500 if args.quick else args.test_subset
    training = training_table(subset, test_subset, args.epochs, [*betas, 0.9])
    if args.quick:
        return
    command = "benchmarks/reversible_bench.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "quick")
    text = [
        "# Reversible DEQ: rebuild drift and training cost",
        "",
        f"Command: `.venv/bin/python {command}` ({datetime.date.today()}, CPU, "
        f"{args.threads} thread(s), {os.cpu_count()} cores shared with other jobs; "
        f"{time.perf_counter() - started:.0f} s in all). See the script's docstring for the "
        "problems.",
        "",
        "## Drift of the rebuilt iterates (float32 state, seed MNIST cell, batch 64)",
        "",
        "Each cell: largest RMS error of a rebuilt pair relative to RMS(x) / relative error "
        "of the parameter gradient against float64 with every pair stored.",
        "",
        *drift,
        "",
        "## Bytes saved for backward per sample (seed MNIST cell, float32, N forced steps)",
        "",
        *memory,
        "",
        f"## Training the seed MNIST DEQ ({args.epochs} epoch(s) of {args.subset} images, "
        f"batch 128, test on {args.test_subset})",
        "",
        *training,
        "",
    ]
    RESULTS.write_text("\n".join(text))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
