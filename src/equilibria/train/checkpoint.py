"""Checkpoints: atomic writes, checksummed and validated loads, the RNG state for exact resume.

A checkpoint is written to a temporary file in the run directory, flushed to disk, and then
renamed over `checkpoint.pt` with os.replace, which is atomic on POSIX: a crash, Ctrl-C or a
full disk during the write leaves the previous checkpoint intact,
never a half-written one. A temporary file left by a killed process is removed by the next
run or resume in that directory (`remove_stale_temporaries`).

Every checkpoint carries the sha256 of its contents (`content_sha256`: every tensor's dtype,
shape and bytes and every other value, in a fixed order). torch's zip container has no
checksum of its own that it checks, so without it a file with flipped bytes in its weights
loads as if nothing happened. A checkpoint whose contents do not match is refused; one
written before checksums existed loads, and `integrity_note` says it could not be verified.
Loading never runs code (weights_only=True): a file that asks to is refused as untrusted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "capture_rng",
    "content_sha256",
    "integrity_note",
    "load_checkpoint",
    "load_optimizer_state",
    "remove_stale_temporaries",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "equilibria-mnist-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pt"
CHECKSUM_KEY = "sha256"
# the keys every checkpoint holds, with their types (the rest are checked where they are used)
_REQUIRED = {"config": dict, "model": dict, "epoch": int, "batch_in_epoch": int,
             "metrics": list, "steps": list}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or belongs to another model or configuration."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` with its checksum to `path` atomically (temporary file, fsync, rename).

    Raises:
        CheckpointError: the disk is full or the directory is not writable (the message
            says which and names the path; the previous checkpoint is untouched).
    """
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, **state}
    state[CHECKSUM_KEY] = content_sha256(state)
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            writer = _RecordingWriter(handle)
            try:
                torch.save(state, writer)
            except RuntimeError as error:  # torch's zip writer hides the OSError beneath
                raise (writer.error or error) from error
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"no space left on the device holding {path}; the previous checkpoint there is "
                "intact. Free some space and continue with --resume, or pass --runs-dir on "
                "another disk."
            ) from error
        raise CheckpointError(
            f"cannot write the checkpoint {path} ({getattr(error, 'strerror', None) or error}); "
            "the previous checkpoint there is intact. Pass --runs-dir with a writable directory."
        ) from error
    finally:
        if tmp.is_file() or tmp.is_symlink():
            tmp.unlink()
    return path


class _RecordingWriter:
    """A file's write() that remembers the OSError it raised (torch.save reports a failed
    write as "[enforce fail at inline_container.cc] unexpected pos", without the errno)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint files in `run_dir` whose writing process is gone.

    A process killed (kill -9, power loss) between creating `.checkpoint.pt.tmpPID` and the
    rename leaves it behind; nothing else would ever remove it. Returns what was removed.
    """
    removed = []
    for tmp in Path(run_dir).glob(f".{CHECKPOINT_NAME}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def content_sha256(state: dict[str, Any]) -> str:
    """sha256 over everything in `state` but its own checksum, in a fixed order.

    Tensors contribute their dtype, shape and raw bytes; other values their type and repr;
    dict keys are visited sorted, lists and tuples in order.
    """
    digest = hashlib.sha256()

    def visit(key: str, value: Any) -> None:
        kind = "sequence" if isinstance(value, (list, tuple)) else type(value).__name__
        digest.update(f"{key}:{kind}:".encode())
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for name in sorted(value, key=str):
                if not (value is state and name == CHECKSUM_KEY):
                    visit(f"{key}/{name}", value[name])
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{key}[{index}]", item)
        else:
            digest.update(repr(value).encode())

    visit("", state)
    return digest.hexdigest()


def integrity_note(path: str | os.PathLike, state: dict[str, Any]) -> str | None:
    """A note to show when a checkpoint was written before checkpoints carried a checksum."""
    if CHECKSUM_KEY in state:
        return None
    return (
        f"note: {path} was written before checkpoints carried a checksum, so damage to it "
        "cannot be detected; the next checkpoint written will carry one."
    )


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    expected_config: dict | None = None,
    identity_fields: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> dict[str, Any]:
    """Read and validate a checkpoint; optionally load its weights into `model`.

    Arguments:
        path: the checkpoint file.
        model: when given, its state_dict must have the checkpoint's keys and shapes.
        expected_config: when given, these `identity_fields` must equal the checkpoint's.
        defaults: values of fields a checkpoint written before they existed does not hold.

    Returns:
        The checkpoint dict (model, optimizer, rng, progress, metrics, config, ...).

    Raises:
        CheckpointError: missing, truncated/unreadable, not ours, untrusted (holds code),
            changed since it was written (checksum), incomplete, non-finite weights, or
            from another model/configuration (the message says which and names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first (equilibria train mnist).")
    state = _read(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an equilibria training checkpoint.")
    if CHECKSUM_KEY in state and content_sha256(state) != state[CHECKSUM_KEY]:
        raise CheckpointError(
            f"{path} fails its integrity check: the sha256 of its contents differs from the "
            "one recorded when it was written, so its weights or state were changed or damaged "
            "on disk. Restore it from a copy, or retrain."
        )
    for key, kind in _REQUIRED.items():
        value = state.get(key)
        if not isinstance(value, kind) or (kind is int and value < 0):
            raise CheckpointError(
                f"{path} lacks a valid {key!r} entry ({type(value).__name__} {value!r:.40}); "
                "it was not written by equilibria. Restore it from a copy, or retrain."
            )
    if expected_config is not None:
        saved = {**(defaults or {}), **state["config"]}
        differences = [
            f"{name}: checkpoint {saved.get(name)!r}, requested {expected_config.get(name)!r}"
            for name in identity_fields
            if saved.get(name) != expected_config.get(name)
        ]
        if differences:
            raise CheckpointError(
                f"{path} belongs to another model/configuration: "
                + "; ".join(differences)
                + ". Use the run's own settings, or another --run-name."
            )
    if model is not None:
        _check_state_dict(path, model, state["model"])
        model.load_state_dict(state["model"])
    return state


def _read(path: Path) -> Any:
    try:
        # weights_only: a checkpoint is data; loading it must not run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise _damaged(path, error) from None
        # torch's text suggests weights_only=False, which would run whatever the file holds
        raise CheckpointError(
            f"{path} is not a trusted equilibria checkpoint: it holds objects other than "
            "tensors and plain values (loading them could run code), so it was refused. Do "
            "not load it with torch.load(weights_only=False); retrain, or restore the run's "
            "checkpoint from a copy you trust."
        ) from None
    except Exception as error:  # zip, EOF, key and OS errors all mean the same to a user
        raise _damaged(path, error) from error


def _damaged(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated or damaged, or not a checkpoint ({type(error).__name__}). "
        "Checkpoints are written atomically, so this file was changed outside equilibria; "
        "retrain, or restore it from a copy."
    )


def load_optimizer_state(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a checkpoint's optimizer state after checking that it fits `optimizer`.

    torch's load_state_dict accepts Adam moments of the wrong shapes and fails only at the
    next step, deep inside Adam; this says which file and parameter instead.

    Raises:
        CheckpointError: no optimizer state, or one for other parameters.
    """
    saved = state.get("optimizer")
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise CheckpointError(
            f"{path} holds no optimizer state, so training cannot continue exactly; evaluate "
            "it with `equilibria evaluate`, or start a new run."
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group.get("params", [])]
    problem = None
    if len(saved_ids) != len(params):
        problem = f"{len(saved_ids)} parameters, the model has {len(params)}"
    for index, param in zip(saved_ids, params):
        for name, value in (saved.get("state") or {}).get(index, {}).items():
            if problem is None and name != "step" and isinstance(value, torch.Tensor) and (
                value.shape != param.shape
            ):
                problem = (
                    f"{name} of parameter {index} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(param.shape)}"
                )
    if problem is not None:
        raise CheckpointError(
            f"{path}: its optimizer state does not fit the model ({problem}); it belongs to "
            "another model. Start a new run, or restore the checkpoint from a copy."
        )
    optimizer.load_state_dict(saved)


def _check_state_dict(path: Path, model: torch.nn.Module, saved: dict) -> None:
    if not all(isinstance(t, torch.Tensor) for t in saved.values()):
        raise CheckpointError(f"{path}: its 'model' entry holds values that are not tensors.")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in saved.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:4]
        extra = sorted(set(found) - set(expected))[:4]
        reshaped = [n for n in expected if n in found and expected[n] != found[n]][:4]
        raise CheckpointError(
            f"{path} holds weights of another model (missing {missing}, unexpected {extra}, "
            f"other shapes {reshaped}); evaluate it with the model it was trained with."
        )
    for name, tensor in saved.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path}: the weights of {name} are not finite (inf or NaN), so every output "
                "would be too. The run diverged before this checkpoint was written, or the "
                "file was altered; retrain with a lower --lr, or restore it from a copy."
            )


def capture_rng() -> dict[str, Any]:
    """The states of python's, numpy's and torch's (CPU and CUDA) generators."""
    numpy_state = np.random.get_state()
    state = {
        "python": _python_state_to_tensor(random.getstate()),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_rest": torch.tensor([numpy_state[2], numpy_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([numpy_state[4]], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    random.setstate(_python_state_from_tensor(state["python"]))
    rest = state["numpy_rest"].tolist()
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(rest[0]),
            int(rest[1]),
            float(state["numpy_gauss"][0]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# random.getstate() is (version, tuple of 625 ints, gauss_next); kept as tensors so that the
# checkpoint loads with weights_only=True.
def _python_state_to_tensor(state: tuple) -> torch.Tensor:
    version, internal, gauss = state
    gauss_flag, gauss_value = (0.0, 0.0) if gauss is None else (1.0, gauss)
    return torch.tensor(
        [float(version), gauss_flag, gauss_value, *map(float, internal)], dtype=torch.float64
    )


def _python_state_from_tensor(tensor: torch.Tensor) -> tuple:
    values = tensor.tolist()
    version, gauss_flag, gauss_value = int(values[0]), values[1], values[2]
    internal = tuple(int(v) for v in values[3:])
    return version, internal, (gauss_value if gauss_flag else None)
