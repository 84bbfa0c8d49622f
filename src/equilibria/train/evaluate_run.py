"""`equilibria evaluate RUN`: rebuild a run's model from config.json, load and check its
checkpoint, and measure accuracy on the MNIST test set."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .config import AMP_DTYPES, TrainConfig
from .distributed import DistContext
from .mnist_loop import _subset_indices, evaluate
from .models import build_model

__all__ = ["evaluate_run"]


def evaluate_run(
    run: str | Path,
    runs_dir: str | Path = "runs",
    data_dir: str | None = None,
    device: str = "cpu",
    test_subset: int | None = None,
) -> dict:
    """Accuracy of a saved run on the test set (the full 10k unless `test_subset`).

    Arguments:
        run: a run directory, or a name under `runs_dir`.

    Returns:
        dict with run_dir, accuracy, loss, forward_nfe_mean, not_converged_share, count,
        epochs (completed when the checkpoint was written).

    Raises:
        CheckpointError: no run there, or a checkpoint that is truncated or belongs to
            another model/configuration than the run's config.json.
    """
    from ..data.mnist import load_mnist, normalize_images

    run_dir = Path(run)
    if not run_dir.is_dir():
        run_dir = Path(runs_dir) / str(run)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{run} is not a run directory (no config.json in {run} or {run_dir})."
        )
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text())).validate()
    except (ValueError, TypeError) as error:
        raise CheckpointError(
            f"{config_path} is not a valid run configuration ({error})."
        ) from error
    if data_dir is not None:
        config.data_dir = data_dir
    target = torch.device(device)
    model = build_model(config)
    state = load_checkpoint(
        run_dir / CHECKPOINT_NAME,
        model,
        expected_config=config.asdict(),
        identity_fields=("model", "width", "hidden", "channels", "solver", "backward"),
    )
    model.to(target)
    arrays = load_mnist(config.data_dir)
    index = _subset_indices(10_000, test_subset, salt=2)
    images = normalize_images(arrays.test_images[index]).to(target)
    labels = arrays.test_labels[index].to(target)
    result = evaluate(model, images, labels, DistContext(0, 1, target, False),
                      amp_dtype=AMP_DTYPES.get(config.amp))
    return {
        "run_dir": str(run_dir),
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "forward_nfe_mean": result["forward_nfe_mean"],
        "not_converged_share": result["not_converged_share"],
        "count": int(index.numel()),
        "epochs": int(state["epoch"]),
    }
