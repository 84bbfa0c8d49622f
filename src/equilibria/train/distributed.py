"""DistributedDataParallel plumbing: process group from torchrun's environment, reductions.

Under `torchrun --nproc-per-node N -m equilibria train mnist ...` each process sees RANK,
WORLD_SIZE and LOCAL_RANK; the group uses gloo on CPU and NCCL on CUDA. Without those
variables everything here degrades to a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "all_reduce_sum", "setup_distributed", "teardown_distributed"]


@dataclass(frozen=True)
class DistContext:
    """rank, world_size and the device this process trains on."""

    rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistContext:
    """Join torchrun's process group when launched by it; pick this process's device.

    Raises:
        ValueError: not a device, or a CUDA device this machine does not have.
    """
    from .config import check_device_available, parse_device

    wanted = check_device_available(parse_device(device, "--device"))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(0, 1, wanted, False)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if wanted.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wanted.type == "cuda" else "gloo")
    return DistContext(rank, world_size, wanted, True)


def teardown_distributed(context: DistContext, *, finished: bool) -> None:
    """Leave the process group.

    After a finished run every rank first meets at a barrier: gloo aborts a process
    ("terminate called without an active exception", SIGABRT) when its peer tears the
    connection down while it is still leaving, which failed about one 2-rank run in six.
    After an error no barrier is attempted (a peer may be gone, and gloo's barrier would
    wait out its 30-minute timeout).
    """
    if context.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(context: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op for one process). Float64 for exact counts."""
    if context.distributed:
        values = values.to(context.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()
