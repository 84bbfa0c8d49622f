"""The seed MNIST DEQ trained with equilibria and with TorchDEQ 0.1.0, side by side.

Same model (flatten -> Linear(784, 100) -> DEQ(f) -> Linear(100, 10) with the seed cell
f(z, x) = Linear(500, 100)(tanh(Linear(100, 500)(z + x)))), same initial weights, same data
order, Adam(3e-4), batch 128, on the same real MNIST; the two libraries only solve for z* and
differentiate through it:

- equilibria: DEQ(solver=Anderson(), backward=Implicit()) (GMRES on VJPs, rtol 1e-6), per-sample
  test RMS(f(z) - z) <= 1e-3 + 1e-3 RMS(z); optionally SteadyState(Tsit5()) (`--with-ode`).
- TorchDEQ: get_deq(f_solver="anderson", f_tol=1e-3, f_stop_mode="rel", ift=True,
  b_solver="anderson", b_tol=1e-6, b_stop_mode="rel"): its relative test
  ||f(z) - z|| / ||f(z)|| <= 1e-3 is the closest it offers (it stops when the whole batch
  passes; ours stops each sample on its own).

Epochs alternate between the libraries so that the load of a shared machine hits both alike.
Reports time per epoch, test accuracy on the full 10k, forward NFE per sample (TorchDEQ: its
solver's step count per batch) and writes benchmarks/results/mnist_torchdeq.md.

    .venv/bin/pip install torch==2.13.0 torchdeq==0.1.0
    .venv/bin/python benchmarks/torchdeq_mnist.py --epochs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import equilibria as eq
from equilibria.data import load_mnist, normalize_images
from equilibria.models.mnist import SeedCell
from side_by_side import run_epoch, test_accuracy

RESULTS = Path(__file__).parent / "results" / "mnist_torchdeq.md"


class EquilibriaSeed(nn.Module):
    def __init__(self, solver) -> None:
        super().__init__()
        self.embed = nn.Linear(784, 100)
        self.cell = SeedCell(100, 500)
        self.deq = eq.DEQ(self.cell, solver=solver, backward=eq.Implicit(), atol=1e-3, rtol=1e-3)
        self.head = nn.Linear(100, 10)

    def forward(self, images):
        x = self.embed(images.flatten(1))
        z = self.deq(x, z0=torch.zeros_like(x))
        return self.head(z), float(self.deq.last_solution.stats["nfe"].double().mean())


class TorchDEQSeed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.embed = nn.Linear(784, 100)
        self.cell = SeedCell(100, 500)
        self.deq = get_deq(
            f_solver="anderson",
            f_max_iter=100,
            f_tol=1e-3,
            f_stop_mode="rel",
            ift=True,
            b_solver="anderson",
            b_max_iter=100,
            b_tol=1e-6,
            b_stop_mode="rel",
        )
        self.head = nn.Linear(100, 10)

    def forward(self, images):
        x = self.embed(images.flatten(1))
        z_out, info = self.deq(lambda z: self.cell(z, x), torch.zeros_like(x))
        return self.head(z_out[-1]), float(torch.as_tensor(info["nstep"]).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=60_000, help="training images")
    parser.add_argument("--with-ode", action="store_true", help="also SteadyState(Tsit5())")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist()
    train_x = normalize_images(data.train_images[: args.subset])
    train_y = data.train_labels[: args.subset]
    test_x, test_y = normalize_images(data.test_images), data.test_labels

    contenders = {"equilibria Anderson + Implicit(GMRES)": lambda: EquilibriaSeed(eq.Anderson())}
    if args.with_ode:
        contenders["equilibria SteadyState(Tsit5()) + Implicit(GMRES)"] = lambda: EquilibriaSeed(
            eq.SteadyState(eq.Tsit5())
        )
    contenders["TorchDEQ 0.1.0 anderson + IFT (anderson)"] = TorchDEQSeed
    models, optimizers, rows = {}, {}, {}
    for name, build in contenders.items():
        torch.manual_seed(0)
        models[name] = build()
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=3e-4)
        rows[name] = []
    # identical initial weights: copy the first model's into the others
    reference = {
        k: v
        for k, v in next(iter(models.values())).state_dict().items()
        if k.split(".")[0] != "deq"
    }
    for model in models.values():
        model.load_state_dict(reference, strict=False)
        assert torch.equal(model.cell.inner.weight, reference["cell.inner.weight"])
    for epoch in range(args.epochs):
        order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(epoch))
        for name, model in models.items():
            seconds, nfe = run_epoch(model, model, optimizers[name], train_x, train_y, order, 128)
            accuracy = test_accuracy(model, model, test_x, test_y)
            rows[name].append((seconds, nfe, accuracy))
            print(
                f"epoch {epoch + 1} {name}: {seconds:.1f} s, forward NFE {nfe:.1f}, "
                f"test accuracy {accuracy:.4f}",
                flush=True,
            )
    table = [
        f"# Seed MNIST DEQ: equilibria vs TorchDEQ 0.1.0 ({args.epochs} epoch(s), "
        f"{train_x.shape[0]} training images, full 10k test set, CPU, {args.threads} thread(s))",
        "",
        "Command: `.venv/bin/python benchmarks/torchdeq_mnist.py "
        f"--epochs {args.epochs}{' --with-ode' if args.with_ode else ''}"
        f"{'' if args.subset == 60_000 else f' --subset {args.subset}'}`. Same f, weights, data "
        "order and optimizer; epochs alternate between libraries on a shared 2-core machine.",
        "",
        "| library / solver | s per epoch (mean) | forward NFE per sample (last epoch) "
        "| test accuracy per epoch | time ratio vs TorchDEQ |",
        "|---|---|---|---|---|",
    ]
    torchdeq_time = sum(r[0] for r in rows[list(rows)[-1]]) / args.epochs
    for name, results in rows.items():
        mean_time = sum(r[0] for r in results) / len(results)
        accuracies = ", ".join(f"{r[2]:.4f}" for r in results)
        table.append(
            f"| {name} | {mean_time:.1f} | {results[-1][1]:.1f} | {accuracies} "
            f"| {mean_time / torchdeq_time:.2f} |"
        )
    text = "\n".join(table) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
