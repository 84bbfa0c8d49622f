"""The training loop: epochs, metrics, checkpoints, exact resume, DDP, fixed-point reuse.

`train_classifier(config)` is the whole run behind `equilibria train mnist` and
`equilibria train fashion-mnist`, for every model (`config.dataset`, `config.model`; no
per-data-set copy). Its order of events is
fixed so that a resumed run computes exactly what the uninterrupted run would have:

- the shuffling of epoch e is DistributedSampler's (a generator seeded with seed + e), so
  the batches of any epoch can be rebuilt without replaying earlier ones;
- a checkpoint holds the model, Adam's state, the python/numpy/torch RNG states, the epoch
  and the batch reached within it, the running sums of that epoch, the fixed-point buffer
  and the metrics and logged steps so far. It is written at every epoch end and on Ctrl-C
  or SIGTERM (mid-epoch, at the next batch boundary; under DDP at the same boundary on every
  rank, with each rank's RNG state and partial sums).

Per epoch, metrics.jsonl gets: loss, train/test accuracy, forward and backward NFE means (per
sample), forward residual statistics, the share of samples whose solve did not converge,
NFE saved by fixed-point reuse (when on), and seconds. It and steps.jsonl are written after
the epoch's checkpoint, which is the source of truth: a resume rewrites them from it when they
disagree (`run_logs`). After every optimizer step the weights are checked for inf/NaN
(`health`): a diverging run stops there, before its checkpoint is overwritten.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from .._autocast import autocast_context
from .augment import augment_plan
from .checkpoint import CHECKPOINT_NAME, capture_rng, remove_stale_temporaries, save_checkpoint
from .config import AMP_DTYPES, TrainConfig
from .data import DATASETS, prepare_data, seed_everything
from .distributed import DistContext, all_reduce_sum, setup_distributed, teardown_distributed
from .epoch_parts import (
    epoch_message,
    final_plots,
    probe_cold_nfe,
    restore_run,
    sync_buffer,
    test_row,
)
from .evaluation import evaluate
from .health import (
    TrainingDiverged,
    blame_divergence,
    diverged_message,
    first_nonfinite_parameter,
    loss_explosion,
    nonfinite_weights,
    not_converged_warning,
)
from .interrupt import AgreedStop, DeferredInterrupt
from .models import build_model
from .run_dir import RunDirError, prepare_run_dir, write_rank_summary
from .run_logs import write_jsonl
from .stats import EpochAccumulator, backward_stats, forward_stats

__all__ = ["RunDirError", "TrainResult", "TrainingDiverged", "evaluate", "train_classifier"]

# Fixed-point reuse: every PROBE_EVERY-th batch is also solved from z0 = 0 (no grad) to
# measure what the warm start saves.
PROBE_EVERY = 10
STEP_LOG_EVERY = 5


def _penalised(config: TrainConfig, epoch: int, batch: int, batches_per_epoch: int) -> bool:
    """Whether this step adds the Jacobian penalty: every jac_every-th step (counted over
    the run, so a resume keeps the schedule), in epochs up to jac_until_epoch."""
    if config.jac_until_epoch is not None and epoch + 1 > config.jac_until_epoch:
        return False
    return (epoch * batches_per_epoch + batch) % config.jac_every == 0


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]
    test_accuracy: float


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def train_classifier(
    config: TrainConfig,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or continue) a DEQ classifier run as described in the module docstring.

    Arguments:
        config: the run's settings (validated here).
        resume: continue runs/NAME from its checkpoint (bit-exactly).
        on_step: called with the global step after each optimizer step (tests use it to
            interrupt a run).
        log: where human messages go (rank 0 only).

    Returns:
        TrainResult(run_dir, metrics, final test accuracy).

    Raises:
        TrainingDiverged: NaN/inf loss, weights or activations (last good checkpoint kept).
        RunDirError, CheckpointError, MnistNotFoundError, MnistCorruptError, ValueError.
        KeyboardInterrupt: re-raised after a usable checkpoint was written.
    """
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    context = setup_distributed(config.device)
    try:
        result = _train(config, resume, on_step, log if context.is_main else _silent, context)
    except AgreedStop:  # every rank stopped at the same boundary: they can still meet
        teardown_distributed(context, finished=True)
        raise
    except BaseException:
        teardown_distributed(context, finished=False)
        raise
    teardown_distributed(context, finished=True)
    return result


def _silent(_: str) -> None:
    pass


def _train(config, resume, on_step, log, context: DistContext) -> TrainResult:
    device = context.device
    if not config.run_name:
        name = [f"{config.dataset}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if context.distributed:  # rank 0's clock names the run for everyone
            import torch.distributed as dist

            dist.broadcast_object_list(name, src=0)
        config.run_name = name[0]
    failure = None
    try:
        run_dir = prepare_run_dir(config, resume, context)
    except RunDirError as error:
        failure = error
    if context.distributed:
        # Every rank must stop when rank 0 cannot use the run directory, or the others hang.
        flag = all_reduce_sum(context, torch.tensor([0.0 if failure is None else 1.0]))
        if failure is None and flag.item() > 0:
            raise RunDirError("rank 0 could not prepare the run directory (see its message).")
    if failure is not None:
        raise failure
    if context.is_main:
        for stale in remove_stale_temporaries(run_dir):
            log(f"removed {stale}, left by a process killed while writing a checkpoint")
    data = prepare_data(config, device)
    log(
        f"data: {data['source']} ({data['train_x'].shape[0]} train, "
        f"{data['test_x'].shape[0]} test images)"
    )
    seed_everything(config.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    amp_dtype = AMP_DTYPES.get(config.amp)
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    n_train = data["train_x"].shape[0]
    buffer = have = None
    if config.reuse_fixed_points:
        # per-sample z* in the model's packed form (a multi-scale state is one flat row)
        buffer = torch.zeros((n_train, *model.buffer_shape), device=device)
        have = torch.zeros(n_train, dtype=torch.bool, device=device)

    start_epoch, start_batch, metrics, steps, partial = 0, 0, [], [], None
    if resume:
        start_epoch, start_batch, metrics, steps, partial = restore_run(
            run_dir, config, model, optimizer, scaler, buffer, have, context, log)

    ddp = model
    if context.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = DistributedSampler(
        range(n_train),
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=config.seed,
    )
    batches_per_epoch = math.ceil(len(sampler) / config.batch_size)
    _, mean, std = DATASETS[config.dataset]
    background = -mean / std  # a black pixel, normalised: what shifted-in borders hold
    penalty_fn = None
    if config.jac_penalty > 0:
        import equilibria as eq

        penalty_fn = eq.jacobian_penalty

    def checkpoint(epoch: int, batch_in_epoch: int, accumulator: EpochAccumulator | None):
        """Rank 0 writes the run's state; under DDP every rank must call this (it gathers
        each rank's RNG and partial epoch sums, which differ between ranks mid-epoch)."""
        mine = {
            "rng": capture_rng(),
            "partial": None if accumulator is None else accumulator.state(),
        }
        ranks = [mine]
        if context.distributed:
            import torch.distributed as dist

            ranks = [None] * context.world_size
            dist.all_gather_object(ranks, mine)
        if not context.is_main:
            return
        save_checkpoint(
            run_dir / CHECKPOINT_NAME,
            {
                "config": config.asdict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),  # empty unless --amp fp16
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "ranks": ranks,  # per rank: RNG state and partial epoch sums
                "metrics": metrics,
                "steps": steps,
                "fp_buffer": buffer,
                "fp_have": have,
            },
        )

    from tqdm.auto import tqdm

    show_bar = context.is_main and not config.quiet and sys.stderr.isatty()
    test_result = None
    # Ctrl-C or SIGTERM is held until the batch has finished; under DDP the ranks agree at
    # every batch boundary (torchrun forwards the signal to each worker, not at the same
    # batch) and all stop there together, so the checkpoint is consistent.
    with DeferredInterrupt() as interrupt:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(iter(sampler)), dtype=torch.long)
            plan = augment_plan(config.augment, config.seed, epoch, n_train, background,
                                device)
            accumulator = EpochAccumulator.from_state(partial)
            partial = None
            first_batch = start_batch if epoch == start_epoch else 0
            bar = tqdm(
                total=batches_per_epoch,
                initial=first_batch,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not show_bar,
                leave=True,
                dynamic_ncols=True,
            )
            model.train()

            def run_batch(batch: int, epoch: int, order: torch.Tensor, accumulator, plan) -> None:
                index = order[batch * config.batch_size : (batch + 1) * config.batch_size]
                index = index.to(device)
                images, labels = data["train_x"][index], data["train_y"][index]
                if plan is not None:
                    images = plan.apply(images, index)
                z0 = None
                if buffer is not None:
                    z0 = torch.where(
                        have[index].view(-1, *([1] * (buffer.dim() - 1))),
                        buffer[index],
                        torch.zeros_like(buffer[index]),
                    )
                with blame_divergence(epoch + 1, batch + 1, run_dir), autocast_context(
                    device.type, amp_dtype
                ):
                    logits = ddp(images, z0=z0).float()
                    loss = _classification_loss(logits, labels)
                    if penalty_fn is not None and _penalised(config, epoch, batch,
                                                             batches_per_epoch):
                        loss = loss + config.jac_penalty * model.jacobian_penalty(penalty_fn)
                loss_value = loss.item()
                what = loss_explosion(loss_value, steps[0]["loss"] if steps else None)
                if what:
                    raise TrainingDiverged(diverged_message(what, epoch + 1, batch + 1, run_dir))
                forward = forward_stats(model.deq.last_solution)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.lr_schedule == "cosine":
                    progress = (epoch * batches_per_epoch + batch) / (
                        config.epochs * batches_per_epoch
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
                scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
                scaler.update()
                broken = first_nonfinite_parameter(model)
                if broken is not None:
                    what = nonfinite_weights(model, broken, loss_value)
                    raise TrainingDiverged(diverged_message(what, epoch + 1, batch + 1, run_dir))
                backward = backward_stats(model.deq)
                probe = None
                if buffer is not None:
                    warm = have[index]
                    buffer[index] = model.last_z_packed
                    have[index] = True
                    if batch % PROBE_EVERY == 0 and bool(warm.any()):
                        with autocast_context(device.type, amp_dtype):
                            probe = probe_cold_nfe(
                                model, images[warm], forward["nfe"][warm.cpu()]
                            )
                accumulator.add(
                    loss_value, logits.detach(), labels, forward, backward, probe, index.numel()
                )
                if batch % STEP_LOG_EVERY == 0:
                    steps.append(
                        {
                            "epoch": epoch + 1,
                            "batch": batch + 1,
                            "loss": loss_value,
                            "forward_nfe": float(forward["nfe"].float().mean()),
                        }
                    )

            completed, at_boundary = first_batch, True
            try:
                for batch in range(first_batch, batches_per_epoch):
                    at_boundary = False
                    run_batch(batch, epoch, order, accumulator, plan)
                    completed, at_boundary = batch + 1, True
                    bar.update(1)
                    if show_bar:
                        bar.set_postfix(accumulator.postfix(), refresh=False)
                    if on_step is not None:
                        on_step(epoch * batches_per_epoch + batch + 1)
                    if interrupt.agreed(context):
                        raise AgreedStop
            except KeyboardInterrupt as stop:
                bar.close()
                # Under DDP only a stop all ranks agreed on may checkpoint (that takes
                # collectives); elsewhere any interrupt between batches may.
                consistent = at_boundary and (
                    isinstance(stop, AgreedStop) or not context.distributed
                )
                if not consistent:
                    # a second Ctrl-C stopped a batch half-way: its state is not consistent
                    log(f"interrupted mid-batch: the last checkpoint in {run_dir} is kept.")
                else:
                    if buffer is not None and context.distributed:
                        visited = order[: completed * config.batch_size]
                        sync_buffer(context, buffer, have, visited)
                    checkpoint(epoch, completed, accumulator)
                    log(f"interrupted: checkpoint saved in {run_dir}; continue with --resume.")
                raise
            bar.close()
            if buffer is not None and context.distributed:
                sync_buffer(context, buffer, have, order)
            with blame_divergence(epoch + 1, None, run_dir):
                test_result = evaluate(ddp, data["test_x"], data["test_y"], context,
                                       amp_dtype=amp_dtype)
            row = {"epoch": epoch + 1, **accumulator.summary(context), **test_row(test_result)}
            metrics.append(row)
            checkpoint(epoch + 1, 0, None)
            if context.is_main:
                write_jsonl(run_dir / "metrics.jsonl", metrics)
                write_jsonl(run_dir / "steps.jsonl", steps)
            log(epoch_message(row, config.epochs))
            shares = {"training": row["not_converged_share"],
                      "test": row["test_not_converged_share"]}
            warning = not_converged_warning(shares, config.max_steps)
            if warning:
                log(warning)
            if interrupt.agreed(context):  # Ctrl-C during the evaluation or the checkpoint
                if epoch + 1 == config.epochs:  # nothing is left to resume
                    log(f"interrupted after the last epoch: the run is complete and saved in "
                        f"{run_dir} (plots skipped); `equilibria evaluate {run_dir}` reports it.")
                else:
                    log(f"interrupted: checkpoint saved in {run_dir}; continue with --resume.")
                raise KeyboardInterrupt
    if test_result is None:  # resumed an already finished run: just evaluate
        test_result = evaluate(ddp, data["test_x"], data["test_y"], context,
                               amp_dtype=amp_dtype)
    if context.distributed:
        write_rank_summary(run_dir, context, model, metrics)
    if context.is_main and config.plots:
        final_plots(run_dir, metrics, steps, test_result, data, config)
    return TrainResult(run_dir, metrics, test_result["accuracy"])


