"""metrics.jsonl and steps.jsonl: written after each epoch's checkpoint, rebuilt from it.

The checkpoint is the run's source of truth: it holds every metrics row and every logged
step. The logs are written just after it, so a process killed in between (kill -9, power
loss) leaves them a row short while the checkpoint says the epoch is done. `sync_logs`,
called by resume and by evaluate, rewrites a log from the checkpoint when they disagree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["LOG_NAMES", "sync_logs", "write_jsonl"]

LOG_NAMES = ("metrics.jsonl", "steps.jsonl")


def _lines(rows: list[dict]) -> list[str]:
    return [json.dumps(row) + "\n" for row in rows]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace `path` with one JSON object a line (atomically: temporary file, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(_lines(rows)))
    os.replace(tmp, path)


def sync_logs(
    run_dir: Path, metrics: list[dict], steps: list[dict], only_missing_rows: bool = False
) -> list[str]:
    """Rewrite the run's logs from a checkpoint's `metrics` and `steps` where they differ.

    Arguments:
        only_missing_rows: repair a log only when it is a strict prefix of the checkpoint's
            rows (evaluate uses this: a training process may be writing newer logs).

    Returns:
        One message per log rewritten (what it held and what the checkpoint holds).
    """
    messages = []
    for name, rows in zip(LOG_NAMES, (metrics, steps)):
        path = run_dir / name
        expected = _lines(rows)
        try:
            found = path.read_text().splitlines(keepends=True) if path.exists() else []
        except (OSError, UnicodeDecodeError):
            found = None
        if found == expected or (not rows and not path.exists()):
            continue
        if only_missing_rows and (found is None or found != expected[: len(found)]):
            continue
        write_jsonl(path, rows)
        held = "could not be read" if found is None else f"had {len(found)} row(s)"
        messages.append(
            f"{path} {held}, the checkpoint {len(rows)}: rewritten from the checkpoint "
            "(a process was stopped between writing the checkpoint and the log)."
        )
    return messages
