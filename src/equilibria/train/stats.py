"""Per-batch solver statistics and their per-epoch sums (resumable, reducible over ranks)."""

from __future__ import annotations

import time

import torch

from .._solution import Status
from .distributed import DistContext, all_reduce_sum

__all__ = ["EpochAccumulator", "backward_stats", "forward_stats"]


def forward_stats(solution) -> dict[str, torch.Tensor]:
    """nfe, residual and not_converged (all (batch,), on CPU) from a DEQ's forward Solution."""
    status = solution.status.detach().cpu()
    success = (status == int(Status.SUCCESS)) | (status == int(Status.EVENT))
    return {
        "nfe": solution.stats["nfe"].detach().cpu().to(torch.float64),
        "residual": solution.stats["residual"].detach().cpu().to(torch.float64),
        "not_converged": ~success,
    }


def backward_stats(deq) -> dict[str, torch.Tensor] | None:
    """nfe and not_converged ((batch,), CPU) of the last backward pass, None if it kept none.

    Strategies without a solve (OneStep, Phantom, Unrolled) report what the DEQ layer
    records for them; the implicit backward reports its linear solve's per-sample NFE.
    """
    stats = getattr(deq, "last_backward_stats", None)
    if not stats or "nfe" not in stats:
        return None
    nfe = torch.as_tensor(stats["nfe"]).detach().cpu().to(torch.float64).reshape(-1)
    if "status" in stats:
        status = torch.as_tensor(stats["status"]).detach().cpu().reshape(-1)
        not_converged = (status != int(Status.SUCCESS)) & (status != int(Status.EVENT))
    else:
        not_converged = torch.zeros(nfe.shape, dtype=torch.bool)
    return {"nfe": nfe, "not_converged": not_converged}


_FIELDS = (
    "loss_sum",
    "correct",
    "count",
    "forward_nfe",
    "forward_not_converged",
    "backward_nfe",
    "backward_count",
    "backward_not_converged",
    "residual_sum",
    "probe_cold",
    "probe_warm",
    "probe_count",
)


class EpochAccumulator:
    """Running sums over one epoch's batches; `state()` round-trips through a checkpoint."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(_FIELDS), dtype=torch.float64)
        self.residual_max = 0.0
        self.residuals: list[torch.Tensor] = []
        self.seconds_before = 0.0  # time spent in this epoch before a resume
        self.started = time.perf_counter()

    @classmethod
    def from_state(cls, state: dict | None) -> EpochAccumulator:
        accumulator = cls()
        if state is not None:
            accumulator.sums = state["sums"].clone()
            accumulator.residual_max = float(state["residual_max"])
            accumulator.residuals = [state["residuals"].clone()]
            accumulator.seconds_before = float(state["seconds"])
        return accumulator

    def state(self) -> dict:
        return {
            "sums": self.sums.clone(),
            "residual_max": self.residual_max,
            "residuals": self._residuals(),
            "seconds": self.seconds_before + time.perf_counter() - self.started,
        }

    def _residuals(self) -> torch.Tensor:
        return torch.cat(self.residuals) if self.residuals else torch.zeros(0, dtype=torch.float64)

    def _add(self, name: str, value: float) -> None:
        self.sums[_FIELDS.index(name)] += value

    def add(self, loss, logits, labels, forward, backward, probe, count) -> None:
        self._add("loss_sum", loss * count)
        self._add("correct", float((logits.argmax(1) == labels).sum()))
        self._add("count", count)
        self._add("forward_nfe", float(forward["nfe"].sum()))
        self._add("forward_not_converged", float(forward["not_converged"].sum()))
        self._add("residual_sum", float(forward["residual"].sum()))
        self.residual_max = max(self.residual_max, float(forward["residual"].max()))
        self.residuals.append(forward["residual"])
        if backward is not None:
            self._add("backward_nfe", float(backward["nfe"].sum()))
            self._add("backward_count", backward["nfe"].numel())
            self._add("backward_not_converged", float(backward["not_converged"].sum()))
        if probe is not None:
            self._add("probe_cold", probe[0])
            self._add("probe_warm", probe[1])
            # samples in the probe = warm NFE sum / mean is unknown; count probed batches'
            # samples through the cold solve instead (see _probe_cold_nfe).
            self._add("probe_count", 1)

    def get(self, name: str) -> float:
        return float(self.sums[_FIELDS.index(name)])

    def postfix(self) -> dict:
        count = max(self.get("count"), 1.0)
        return {
            "loss": f"{self.get('loss_sum') / count:.3f}",
            "acc": f"{self.get('correct') / count:.3f}",
            "nfe": f"{self.get('forward_nfe') / count:.1f}",
        }

    def summary(self, context: DistContext) -> dict:
        """The epoch's metrics, summed over ranks under DDP."""
        sums = all_reduce_sum(context, self.sums.clone())
        seconds = self.seconds_before + time.perf_counter() - self.started
        residual_max = torch.tensor([self.residual_max], dtype=torch.float64)
        if context.distributed:
            import torch.distributed as dist

            residual_max = residual_max.to(context.device)
            dist.all_reduce(residual_max, op=dist.ReduceOp.MAX)
        local = self._residuals()
        if context.distributed:  # the median needs every rank's residuals
            import torch.distributed as dist

            parts = [None] * context.world_size
            dist.all_gather_object(parts, local)
            local = torch.cat(parts)

        def value(name: str) -> float:
            return float(sums[_FIELDS.index(name)])

        count = max(value("count"), 1.0)
        backward_count = value("backward_count")
        row = {
            "loss": value("loss_sum") / count,
            "train_accuracy": value("correct") / count,
            "forward_nfe_mean": value("forward_nfe") / count,
            "backward_nfe_mean": (
                value("backward_nfe") / backward_count if backward_count else float("nan")
            ),
            "residual_mean": value("residual_sum") / count,
            "residual_median": float(local.median()) if local.numel() else float("nan"),
            "residual_max": float(residual_max.cpu()[0]),
            "not_converged_share": value("forward_not_converged") / count,
            "backward_not_converged_share": (
                value("backward_not_converged") / backward_count if backward_count else 0.0
            ),
            "seconds": seconds,
        }
        if value("probe_count"):
            cold, warm = value("probe_cold"), value("probe_warm")
            row["reuse_probe_cold_nfe_sum"] = cold
            row["reuse_probe_warm_nfe_sum"] = warm
            row["reuse_nfe_saved_share"] = (cold - warm) / cold if cold else 0.0
            # Extrapolated to the epoch: the share saved times the epoch's warm NFE / (1 - s).
            forward = value("forward_nfe")
            share = row["reuse_nfe_saved_share"]
            row["reuse_nfe_saved_epoch"] = forward * share / (1 - share) if share < 1 else 0.0
        return row
