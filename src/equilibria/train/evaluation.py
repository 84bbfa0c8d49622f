"""Accuracy, loss and solver statistics of a model on a test set (sharded over ranks)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._autocast import autocast_context
from .distributed import DistContext, all_reduce_sum
from .stats import forward_stats

__all__ = ["evaluate", "test_row"]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    context: DistContext | None = None,
    batch_size: int = 500,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Accuracy, loss, forward NFE and residuals on a set, sharded over ranks under DDP
    (under autocast in `amp_dtype` when given, as the model was trained).

    Returns:
        dict with accuracy, loss, forward_nfe_mean, not_converged_share, and per-sample
        `residuals` and `predictions` (in the set's order, gathered over ranks) for plots.
    """
    context = context or DistContext(0, 1, images.device, False)
    core = getattr(model, "module", model)
    was_training = core.training
    core.eval()
    shard = torch.arange(context.rank, images.shape[0], context.world_size)
    sums = torch.zeros(5, dtype=torch.float64)  # correct, loss, nfe, not converged, count
    residuals, predictions = [], []
    for start in range(0, shard.numel(), batch_size):
        index = shard[start : start + batch_size].to(images.device)
        with autocast_context(images.device.type, amp_dtype):
            logits = core(images[index]).float()
        solution = core.deq.last_solution
        stats = forward_stats(solution)
        sums += torch.tensor(
            [
                float((logits.argmax(1) == labels[index]).sum()),
                float(F.cross_entropy(logits, labels[index], reduction="sum")),
                float(stats["nfe"].sum()),
                float(stats["not_converged"].sum()),
                float(index.numel()),
            ],
            dtype=torch.float64,
        )
        residuals.append(stats["residual"].cpu())
        predictions.append(logits.argmax(1).cpu())
    core.train(was_training)
    sums = all_reduce_sum(context, sums)
    residuals = torch.cat(residuals) if residuals else torch.zeros(0, dtype=torch.float64)
    predictions = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    if context.distributed:
        # reassemble the per-sample results in the test set's order on every rank
        import torch.distributed as dist

        parts = [None] * context.world_size
        dist.all_gather_object(parts, (shard, residuals, predictions))
        residuals = torch.zeros(images.shape[0], dtype=torch.float64)
        predictions = torch.zeros(images.shape[0], dtype=torch.long)
        for part_shard, part_residuals, part_predictions in parts:
            residuals[part_shard] = part_residuals
            predictions[part_shard] = part_predictions
    count = max(sums[4].item(), 1.0)
    return {
        "accuracy": sums[0].item() / count,
        "loss": sums[1].item() / count,
        "forward_nfe_mean": sums[2].item() / count,
        "not_converged_share": sums[3].item() / count,
        "residuals": residuals,
        "predictions": predictions,
    }


def test_row(result: dict) -> dict:
    """The test-set columns of a metrics.jsonl row from `evaluate`'s result."""
    residuals = result["residuals"]
    return {
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "test_forward_nfe_mean": result["forward_nfe_mean"],
        "test_not_converged_share": result["not_converged_share"],
        "test_residual_median": float(residuals.median()) if residuals.numel() else math.nan,
    }
