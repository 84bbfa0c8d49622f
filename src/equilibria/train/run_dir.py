"""The run directory: created (or checked, for --resume) before any training, on rank 0."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME
from .config import TrainConfig
from .distributed import DistContext

__all__ = ["RunDirError", "prepare_run_dir", "write_rank_summary"]


class RunDirError(RuntimeError):
    """The run directory cannot be created or written, or already holds another run."""


def prepare_run_dir(config: TrainConfig, resume: bool, context: DistContext) -> Path:
    run_dir = Path(config.runs_dir) / config.run_name
    if not context.is_main:
        return run_dir
    if resume:
        if not (run_dir / CHECKPOINT_NAME).is_file():
            if (run_dir / "metrics.jsonl").exists():
                raise RunDirError(
                    f"--resume: {run_dir} has trained epochs but no {CHECKPOINT_NAME} to continue "
                    "from; restore it from a copy, or start again with another --run-name."
                )
            raise RunDirError(f"--resume: no checkpoint in {run_dir}; start it without --resume.")
        return run_dir
    if (run_dir / CHECKPOINT_NAME).exists() or (run_dir / "metrics.jsonl").exists():
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another "
            "--run-name."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise RunDirError(
            f"cannot write the run directory {run_dir} ({error.strerror or error}); pass "
            "--runs-dir with a writable directory."
        ) from error
    (run_dir / "config.json").write_text(json.dumps(config.asdict(), indent=2) + "\n")
    return run_dir


def write_rank_summary(run_dir: Path, context, model, metrics) -> None:
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    summary = {"rank": context.rank, "parameter_checksum": checksum, "metrics": metrics}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"rank{context.rank}_summary.json").write_text(json.dumps(summary) + "\n")
