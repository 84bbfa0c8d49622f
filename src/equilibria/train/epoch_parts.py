"""Pieces of the epoch loop that are not the loop: restoring a run from its checkpoint,
per-rank checkpoint state, the test row of the metrics and the epoch's log line, the
cold-start probe of fixed-point reuse, the DDP buffer sync, the final plots."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    integrity_note,
    load_checkpoint,
    load_optimizer_state,
    restore_rng,
)
from .config import IDENTITY_FIELDS, TrainConfig
from .distributed import DistContext
from .run_logs import sync_logs
from .stats import forward_stats

__all__ = [
    "epoch_message",
    "final_plots",
    "probe_cold_nfe",
    "rank_state",
    "restore_run",
    "sync_buffer",
    "test_row",
]


def restore_run(run_dir: Path, config: TrainConfig, model, optimizer, scaler,
                buffer: torch.Tensor | None, have: torch.Tensor | None, context: DistContext,
                log: Callable[[str], None]) -> tuple[int, int, list, list, dict | None]:
    """Load runs/NAME's checkpoint into the model, optimizer, scaler, RNGs and fixed-point
    buffer (refusing one of another configuration, or with more epochs than `config`);
    returns (epoch, batch within it, metrics, logged steps, this rank's partial sums)."""
    path = run_dir / CHECKPOINT_NAME
    state = load_checkpoint(path, model, config.asdict(), identity_fields=IDENTITY_FIELDS,
                            defaults=TrainConfig().asdict())
    load_optimizer_state(path, optimizer, state)
    if state["epoch"] > config.epochs:
        raise CheckpointError(
            f"{run_dir} has already trained {state['epoch']} epochs; --epochs "
            f"{config.epochs} is fewer. Pass --epochs {state['epoch'] + 1} or more to "
            f"train further, or evaluate it with `equilibria evaluate {run_dir}`."
        )
    note = integrity_note(path, state)
    if note:
        log(note)
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    start_epoch, start_batch = state["epoch"], state["batch_in_epoch"]
    metrics, steps = state["metrics"], state["steps"]
    mine = rank_state(state, context)
    restore_rng(mine["rng"])
    if buffer is not None:
        buffer.copy_(state["fp_buffer"])
        have.copy_(state["fp_have"])
    if context.is_main:
        (run_dir / "config.json").write_text(json.dumps(config.asdict(), indent=2) + "\n")
        for message in sync_logs(run_dir, metrics, steps):
            log(message)
    if start_epoch == config.epochs:
        log(f"{run_dir} has finished its {config.epochs} epochs; evaluating it (pass "
            "--epochs with more to train further)")
    else:
        log(f"resumed {run_dir} at epoch {start_epoch + 1}, batch {start_batch}")
    return start_epoch, start_batch, metrics, steps, mine["partial"]


def epoch_message(row: dict, epochs: int) -> str:
    """The line logged after an epoch, from its metrics row."""
    reuse = ""
    if "reuse_nfe_saved_share" in row:
        reuse = (f"; fixed-point reuse saved {row['reuse_nfe_saved_share']:.0%} of forward NFE "
                 f"(~{row['reuse_nfe_saved_epoch']:.0f} evaluations this epoch)")
    return (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, train acc "
            f"{row['train_accuracy']:.4f}, test acc {row['test_accuracy']:.4f}, forward NFE "
            f"{row['forward_nfe_mean']:.1f}, backward NFE {row['backward_nfe_mean']:.1f}, "
            f"not converged {row['not_converged_share']:.1%}, {row['seconds']:.1f} s" + reuse)


def rank_state(state: dict, context: DistContext) -> dict:
    """This rank's RNG state and partial epoch sums from a checkpoint.

    Mid-epoch they differ between ranks, so the run must resume with as many processes as
    it was interrupted with; at an epoch boundary every rank's are the same (rank 0's)."""
    # (checkpoints written before per-rank state kept one "rng" and "partial")
    ranks = state.get("ranks") or [{"rng": state["rng"], "partial": state["partial"]}]
    if len(ranks) == context.world_size:
        return ranks[context.rank]
    if state["batch_in_epoch"] == 0:
        return ranks[0]
    raise CheckpointError(
        f"this checkpoint was written mid-epoch by {len(ranks)} process(es); resume it with "
        f"the same number (torchrun --nproc-per-node {len(ranks)}"
        + (", or without torchrun" if len(ranks) == 1 else "")
        + f"), not {context.world_size}."
    )


def test_row(result: dict) -> dict:
    residuals = result["residuals"]
    return {
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "test_forward_nfe_mean": result["forward_nfe_mean"],
        "test_not_converged_share": result["not_converged_share"],
        "test_residual_median": float(residuals.median()) if residuals.numel() else math.nan,
    }


@torch.no_grad()
def probe_cold_nfe(model, images: torch.Tensor, warm_nfe: torch.Tensor) -> tuple[float, float]:
    """(cold NFE sum, warm NFE sum) on the warm-started samples of a batch."""
    model(images)
    cold = forward_stats(model.deq.last_solution)["nfe"]
    return float(cold.sum()), float(warm_nfe.sum())


def sync_buffer(context, buffer, have, order) -> None:
    """Make the fixed-point buffer identical on all ranks after an epoch.

    Each rank solved its shard of `order`; every rank adds what it holds for its own shard
    and the sum (divided by how many ranks held a sample: DistributedSampler pads by
    repeating) is the buffer everyone keeps.
    """
    import torch.distributed as dist

    mine = torch.zeros(buffer.shape[0], dtype=buffer.dtype, device=buffer.device)
    mine[order.to(buffer.device)] = 1.0  # `order` is this rank's shard of the epoch
    contribution = buffer * mine.view(-1, *([1] * (buffer.dim() - 1)))
    dist.all_reduce(contribution)
    dist.all_reduce(mine)
    seen = mine > 0
    buffer[seen] = contribution[seen] / mine[seen].view(-1, *([1] * (buffer.dim() - 1)))
    have_any = have.to(torch.float32)
    dist.all_reduce(have_any)
    have.copy_(have_any > 0)


def final_plots(run_dir, metrics, steps, test_result, data, config) -> None:
    from .. import plots

    plots.training_curves(metrics, steps, run_dir / "curves.png")
    plots.nfe_per_epoch(metrics, run_dir / "nfe.png")
    plots.residual_histogram(test_result["residuals"], run_dir / "residuals.png", atol=config.atol)
    count = min(16, data["test_u8"].shape[0])
    plots.digit_grid(
        data["test_u8"][:count],
        data["test_y"][:count].cpu(),
        test_result["predictions"][:count],
        run_dir / "digits.png",
    )
