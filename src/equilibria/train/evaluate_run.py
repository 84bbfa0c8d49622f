"""`equilibria evaluate RUN`: rebuild a run's model from config.json, load and check its
checkpoint, and measure accuracy on its data set's test set, optionally with another forward
step bound or tolerances than it trained with (a DEQ may be given more steps at test time)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, CheckpointError, integrity_note, load_checkpoint
from .config import AMP_DTYPES, check_device_available, parse_device, read_run_config
from .data import DATASETS, normalize, subset_indices
from .distributed import DistContext
from .evaluation import evaluate
from .health import not_converged_warning
from .models import build_model
from .run_logs import sync_logs

__all__ = ["evaluate_run"]


def evaluate_run(
    run: str | Path,
    runs_dir: str | Path = "runs",
    data_dir: str | None = None,
    device: str = "cpu",
    test_subset: int | None = None,
    max_steps: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> dict:
    """Accuracy of a saved run on the test set (the full 10k unless `test_subset`).

    Arguments:
        run: a run directory, or a name under `runs_dir`.
        max_steps, atol, rtol: the forward solve's step bound and tolerances for this
            evaluation (default: the run's own); the weights are the checkpoint's either way.

    Returns:
        dict with run_dir, accuracy, loss, forward_nfe_mean, not_converged_share, count,
        epochs (completed when the checkpoint was written), solve (the forward settings
        used: max_steps, atol, rtol) and notes: messages for the user (an unverifiable
        old checkpoint, logs rebuilt from the checkpoint, unconverged solves).

    Raises:
        CheckpointError: no run there, an invalid config.json, or a checkpoint that is
            truncated, damaged or belongs to another model/configuration than config.json.
        ValueError: a device that is not one, or a GPU this machine lacks; a test_subset
            larger than the test set; a max_steps, atol or rtol that is not positive.
    """

    run_dir = Path(run)
    if not run_dir.is_dir():
        run_dir = Path(runs_dir) / str(run)
    try:
        config, note = read_run_config(run_dir)
    except FileNotFoundError:
        where = run_dir if run_dir == Path(run) else f"{run} or {run_dir}"
        raise CheckpointError(
            f"{where} is not a run directory (no config.json or checkpoint.pt); pass runs/NAME "
            "or a run name under --runs-dir."
        ) from None
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    if data_dir is not None:
        config.data_dir = data_dir
    target = check_device_available(parse_device(device, "--device"))
    if test_subset is not None and test_subset > 10_000:
        raise ValueError(f"--test-subset must be <= 10000 (the test set), got {test_subset}.")
    overrides = {name: value for name, value in
                 (("max_steps", max_steps), ("atol", atol), ("rtol", rtol)) if value is not None}
    # The run's own config is what the checkpoint is checked against; the solve may differ.
    solve_config = dataclasses.replace(config, **overrides).validate()
    model = build_model(solve_config)
    path = run_dir / CHECKPOINT_NAME
    state = load_checkpoint(
        path,
        model,
        expected_config=config.asdict(),
        identity_fields=("dataset", "model", "width", "hidden", "channels", "scales",
                         "dropout", "solver", "backward"),
    )
    notes = [note for note in [note, integrity_note(path, state)] if note]
    try:
        notes += sync_logs(run_dir, state["metrics"], state["steps"], only_missing_rows=True)
    except OSError as error:
        notes.append(f"note: the logs in {run_dir} lack rows of the checkpoint ({error}).")
    model.to(target)
    arrays = DATASETS[config.dataset][0](config.data_dir)
    index = subset_indices(arrays.test_images.shape[0], test_subset, salt=2)
    images = normalize(arrays.test_images[index], config.dataset).to(target)
    labels = arrays.test_labels[index].to(target)
    result = evaluate(model, images, labels, DistContext(0, 1, target, False),
                      amp_dtype=AMP_DTYPES.get(config.amp))
    warning = not_converged_warning({"test": result["not_converged_share"]},
                                    solve_config.max_steps)
    return {
        "run_dir": str(run_dir),
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "forward_nfe_mean": result["forward_nfe_mean"],
        "not_converged_share": result["not_converged_share"],
        "count": int(index.numel()),
        "epochs": int(state["epoch"]),
        "solve": {name: getattr(solve_config, name) for name in ("max_steps", "atol", "rtol")},
        "notes": notes + ([warning] if warning else []),
    }
