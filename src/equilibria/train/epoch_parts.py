"""Pieces of the epoch loop that are not the loop: per-rank checkpoint state, the test row of
the metrics, the cold-start probe of fixed-point reuse, the DDP buffer sync, the final plots."""

from __future__ import annotations

import math

import torch

from .checkpoint import CheckpointError
from .distributed import DistContext
from .stats import forward_stats

__all__ = ["final_plots", "probe_cold_nfe", "rank_state", "sync_buffer", "test_row"]


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
