"""Checkpoints: atomic writes, validated loads, and the RNG state needed for exact resume.

A checkpoint is written to a temporary file in the run directory, flushed to disk, and then
renamed over `checkpoint.pt` with os.replace, which is atomic on POSIX: a crash or Ctrl-C
during the write leaves the previous checkpoint intact, never a half-written one.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "equilibria-mnist-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or belongs to another model or configuration."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temporary file, fsync, os.replace).

    Raises:
        OSError: the directory is not writable (the previous checkpoint is untouched).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
        CheckpointError: missing, truncated/unreadable, not ours, or from another
            model/configuration (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first (equilibria train mnist).")
    try:
        # weights_only: a checkpoint is data; loading it must not run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(
            f"{path} is truncated or damaged ({type(error).__name__}: {str(error)[:200]}). "
            "Checkpoints are written atomically, so this file was changed outside equilibria; "
            "retrain, or restore it from a copy."
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an equilibria MNIST checkpoint.")
    if expected_config is not None:
        saved = {**(defaults or {}), **state.get("config", {})}
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


def _check_state_dict(path: Path, model: torch.nn.Module, saved: dict) -> None:
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
