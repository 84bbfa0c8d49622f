"""The multi-scale DEQ trained with equilibria and with TorchDEQ 0.1.0, side by side.

Same model (`equilibria.models.mdeq.MultiscaleDEQ`: stem, per-scale injections, a two-scale
cell of residual branches and fusion, pooled head), same initial weights, same data order,
Adam, on the same real data (Fashion-MNIST or MNIST); each library brings its own weight
normalisation and variational dropout, and solves for z* and differentiates through it:

- equilibria: torch's `parametrizations.weight_norm` on every convolution of the cell (the
  DEQ evaluates it once per solve), `eq.VariationalDropout2d`, the tuple state as is,
  DEQ(solver=Anderson(), backward=Implicit()), per-sample test
  RMS(f(z) - z) <= atol + rtol RMS(z).
- TorchDEQ: `torchdeq.norm.apply_norm(cell, "weight_norm")` with `reset_norm` before every
  call, `torchdeq.dropout.VariationalDropout2d` with `reset_dropout`, get_deq(f_solver=
  "anderson", f_stop_mode="rel", ift=True, b_solver="anderson"): its relative test
  ||f(z) - z|| / ||f(z)|| <= f_tol, checked on the whole batch.

`--contenders` adds equilibria's faster settings (per-sample compaction, a looser backward)
and TorchDEQ with the same looser backward, so that a speed-up is shown against both.
Epochs alternate between the contenders so that the load of a shared machine hits both alike.
Reports time per epoch, forward NFE per sample and test accuracy per epoch, and writes
benchmarks/results/mdeq_torchdeq.md.

    .venv/bin/pip install torch==2.13.0 torchdeq==0.1.0
    .venv/bin/python benchmarks/torchdeq_mdeq.py --dataset fashion-mnist --epochs 2
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from torch import nn

import equilibria as eq
from equilibria.models.mdeq import MultiscaleDEQ
from equilibria.train.data import DATASETS, normalize
from side_by_side import run_epoch, test_accuracy

RESULTS = Path(__file__).parent / "results" / "mdeq_torchdeq.md"


def equilibria_model(channels, dropout, rtol, max_steps, backward_rtol=1e-6,
                     compact=False) -> MultiscaleDEQ:
    def factory(cell, shapes):
        return eq.DEQ(cell, solver=eq.Anderson(), z_shape=shapes, compact=compact,
                      backward=eq.Implicit(eq.GMRES(rtol=backward_rtol)),
                      atol=1e-6, rtol=rtol, max_steps=max_steps)

    return MultiscaleDEQ(factory, channels=channels, dropout=dropout)


class _TorchDEQLayer(nn.Module):
    """TorchDEQ's DEQ around the same cell: its weight norm and variational dropout."""

    def __init__(self, cell, shapes, dropout, rtol, max_steps, backward_rtol) -> None:
        super().__init__()
        from torchdeq import get_deq
        from torchdeq.dropout import VariationalDropout2d
        from torchdeq.norm import apply_norm

        for block in cell.blocks:
            block.drop = VariationalDropout2d(dropout)
        apply_norm(cell, "weight_norm")
        self.cell = cell
        self.shapes = shapes
        self.deq = get_deq(f_solver="anderson", f_max_iter=max_steps, f_tol=rtol,
                           f_stop_mode="rel", ift=True, b_solver="anderson",
                           b_max_iter=max_steps, b_tol=backward_rtol, b_stop_mode="rel")
        self.last_nfe = 0.0

    def forward(self, x, z0=None):
        from torchdeq.dropout import reset_dropout
        from torchdeq.norm import reset_norm

        reset_norm(self.cell)
        reset_dropout(self.cell)
        batch = x[0].shape[0]
        z_init = tuple(x[0].new_zeros((batch, *shape)) for shape in self.shapes)
        # TorchDEQ hands a multi-tensor state to f as separate arguments
        z_out, info = self.deq(lambda *z: self.cell(z, x), z_init)
        self.last_nfe = float(torch.as_tensor(info["nstep"]).double().mean())
        return tuple(z_out[-1])


def torchdeq_model(channels, dropout, rtol, max_steps, backward_rtol=1e-6) -> MultiscaleDEQ:
    def factory(cell, shapes):
        return _TorchDEQLayer(cell, shapes, dropout, rtol, max_steps, backward_rtol)

    return MultiscaleDEQ(factory, channels=channels, dropout=0.0, weight_norm=False)


CONTENDERS = {
    "eq-matched": (
        "equilibria Anderson + Implicit, GMRES rtol 1e-6 (TorchDEQ's settings)",
        equilibria_model,
    ),
    "eq-fast": (
        "equilibria Anderson, compact=True + Implicit, GMRES rtol 1e-2",
        partial(equilibria_model, backward_rtol=1e-2, compact=True),
    ),
    "torchdeq": ("TorchDEQ 0.1.0 anderson + IFT, b_tol 1e-6 (its defaults here)", torchdeq_model),
    "torchdeq-loose": (
        "TorchDEQ 0.1.0 anderson + IFT, b_tol 1e-2", partial(torchdeq_model, backward_rtol=1e-2),
    ),
}


def forward_nfe(model) -> float:
    deq = model.deq
    if isinstance(deq, eq.DEQ):
        return float(deq.last_solution.stats["nfe"].double().mean())
    return deq.last_nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=60_000, help="training images")
    parser.add_argument("--test-subset", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=24)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--contenders", nargs="+", choices=sorted(CONTENDERS),
                        default=["eq-matched", "torchdeq"],
                        help="which models to train ('torchdeq' is the reference, always run)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results table")
    args = parser.parse_args()
    if "torchdeq" not in args.contenders:
        args.contenders.append("torchdeq")
    torch.set_num_threads(args.threads)
    data = DATASETS[args.dataset][0](None)
    train_x = normalize(data.train_images[: args.subset], args.dataset)
    train_y = data.train_labels[: args.subset]
    test_x = normalize(data.test_images[: args.test_subset], args.dataset)
    test_y = data.test_labels[: args.test_subset]
    channels = (args.channels, 2 * args.channels)
    models, optimizers, rows = {}, {}, {}
    for key in args.contenders:
        torch.manual_seed(0)
        models[key] = CONTENDERS[key][1](channels, args.dropout, args.rtol, args.max_steps)
        rows[key] = []
    # identical initial weights: the stem, injections and head, and the cell's weights (the
    # torch weight norm's direction v and magnitude g start as the plain weight and its norm,
    # as TorchDEQ's do, so copying the plain weights makes both cells the same function);
    # TorchDEQ's models are built alike from the same seed
    reference = models["torchdeq"]
    plain = {k: v for k, v in reference.state_dict().items() if not k.startswith("deq.")}
    for key, model in models.items():
        if not key.startswith("eq-"):
            continue
        model.load_state_dict(plain, strict=False)
        for conv_name, module in reference._cell[0].named_modules():
            if isinstance(module, nn.Conv2d):
                target = model._cell[0].get_submodule(conv_name)
                weight = getattr(module, "weight_v", module.weight).detach()
                with torch.no_grad():
                    target.parametrizations.weight.original1.copy_(weight)
                    target.parametrizations.weight.original0.copy_(
                        torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True))
    for name, model in models.items():
        optimizers[name] = torch.optim.Adam(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(epoch))
        for name, model in models.items():
            def forward(images, model=model):
                return model(images), forward_nfe(model)

            seconds, nfe = run_epoch(model, forward, optimizers[name], train_x, train_y, order,
                                     args.batch_size)
            accuracy = test_accuracy(model, forward, test_x, test_y)
            rows[name].append((seconds, nfe, accuracy))
            print(f"epoch {epoch + 1} {name}: {seconds:.1f} s, forward NFE {nfe:.1f}, "
                  f"test accuracy {accuracy:.4f}", flush=True)
    reference = sum(r[0] for r in rows["torchdeq"]) / args.epochs
    table = [
        f"# Multi-scale DEQ on {args.dataset}: equilibria vs TorchDEQ 0.1.0 ({args.epochs} "
        f"epoch(s), {train_x.shape[0]} training / {test_x.shape[0]} test images, CPU, "
        f"{args.threads} thread(s))",
        "",
        f"Command: `.venv/bin/python benchmarks/torchdeq_mdeq.py --dataset {args.dataset} "
        f"--epochs {args.epochs} --subset {args.subset} --test-subset {args.test_subset} "
        f"--channels {args.channels} --output results/{args.output.name} "
        f"--contenders {' '.join(args.contenders)}`. Same cell, "
        "initial weights, data order and optimizer; "
        "epochs alternate between the contenders (wall time on a shared machine).",
        "",
        "| library | s per epoch (mean) | forward NFE per sample (last epoch) | test accuracy "
        "per epoch | time ratio vs TorchDEQ |",
        "|---|---|---|---|---|",
    ]
    for name, results in rows.items():
        mean_time = sum(r[0] for r in results) / len(results)
        accuracies = ", ".join(f"{r[2]:.4f}" for r in results)
        table.append(f"| {CONTENDERS[name][0]} | {mean_time:.1f} | {results[-1][1]:.1f} | "
                     f"{accuracies} | {mean_time / reference:.2f} |")
    text = "\n".join(table) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
