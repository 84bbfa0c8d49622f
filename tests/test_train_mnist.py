"""The MNIST training loop: it learns, resumes bit-exactly, and keeps checkpoints safe."""

from __future__ import annotations

import json

import pytest
import torch

from equilibria.train import loop
from equilibria.train.checkpoint import CheckpointError, load_checkpoint
from equilibria.train.config import TrainConfig
from equilibria.train.loop import TrainingDiverged, train_classifier

TIMING = {"seconds"}


def _config(tmp_path, name, **overrides) -> TrainConfig:
    values = dict(
        solver="picard",
        subset=384,
        test_subset=300,
        batch_size=64,
        epochs=2,
        lr=1e-3,
        seed=3,
        run_name=name,
        runs_dir=str(tmp_path),
        quiet=True,
        max_steps=50,
        plots=False,
        threads=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def test_short_mnist_epoch_on_the_ode_path_learns(tmp_path):
    config = _config(
        tmp_path,
        "learn",
        solver="steady-state-tsit5",
        subset=512,
        epochs=1,
        lr=2e-3,
        plots=True,
    )
    result = train_classifier(config, log=lambda _: None)
    row = result.metrics[0]
    assert result.test_accuracy > 0.5  # chance is 0.1; 8 steps of Adam
    assert row["forward_nfe_mean"] > 0 and row["backward_nfe_mean"] > 0
    assert row["not_converged_share"] < 0.05
    for key in ("loss", "train_accuracy", "residual_median", "seconds", "test_loss"):
        assert key in row
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["test_accuracy"] == row["test_accuracy"]
    for png in ("curves.png", "nfe.png", "residuals.png", "digits.png"):
        assert (result.run_dir / png).stat().st_size > 1000
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["solver"] == "steady-state-tsit5" and saved["subset"] == 512


def test_resume_after_an_epoch_equals_uninterrupted(tmp_path):
    whole = train_classifier(_config(tmp_path, "whole"), log=lambda _: None)
    train_classifier(_config(tmp_path, "split", epochs=1), log=lambda _: None)
    resumed = train_classifier(_config(tmp_path, "split", epochs=2), resume=True,
                               log=lambda _: None)
    assert _without_timing(resumed.metrics) == _without_timing(whole.metrics)
    a, b = _weights(whole.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_mid_epoch_leaves_a_checkpoint_that_resumes_exactly(tmp_path):
    reference = train_classifier(_config(tmp_path, "ref", reuse_fixed_points=True),
                                 log=lambda _: None)

    def interrupt(step: int) -> None:
        if step == 8:  # after epoch 2, batch 2 of 6
            raise KeyboardInterrupt

    config = _config(tmp_path, "cut", reuse_fixed_points=True)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(config, on_step=interrupt, log=lambda _: None)
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    resumed = train_classifier(
        _config(tmp_path, "cut", reuse_fixed_points=True), resume=True, log=lambda _: None
    )
    assert _without_timing(resumed.metrics) == _without_timing(reference.metrics)
    a, b = _weights(reference.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # fixed-point reuse measured what it saves
    assert resumed.metrics[1]["reuse_nfe_saved_share"] > 0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    train_classifier(_config(tmp_path, "nan", epochs=1), log=lambda _: None)
    before = (tmp_path / "nan" / "checkpoint.pt").read_bytes()
    real = loop._classification_loss
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(loop, "_classification_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2, batch 2"):
        train_classifier(_config(tmp_path, "nan", epochs=2), resume=True, log=lambda _: None)
    assert (tmp_path / "nan" / "checkpoint.pt").read_bytes() == before


def test_checkpoint_of_another_model_and_truncated_file_are_refused(tmp_path):
    train_classifier(_config(tmp_path, "a", epochs=1), log=lambda _: None)
    path = tmp_path / "a" / "checkpoint.pt"
    other = _config(tmp_path, "b", model="conv", channels=8).asdict()
    with pytest.raises(CheckpointError, match="another model/configuration: model"):
        load_checkpoint(path, expected_config=other, identity_fields=("model",))
    from equilibria.train.models import build_model

    with pytest.raises(CheckpointError, match="weights of another model"):
        load_checkpoint(path, model=build_model(TrainConfig(model="conv", channels=8)))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(truncated)


def test_existing_run_is_not_overwritten(tmp_path):
    train_classifier(_config(tmp_path, "once", epochs=1, subset=64), log=lambda _: None)
    with pytest.raises(loop.RunDirError, match="already holds a run"):
        train_classifier(_config(tmp_path, "once", epochs=1, subset=64), log=lambda _: None)


@pytest.mark.cuda
def test_short_run_on_cuda_learns_and_resumes(tmp_path):
    config = _config(tmp_path, "gpu", device="cuda", epochs=1, reuse_fixed_points=True)
    first = train_classifier(config, log=lambda _: None)
    assert first.test_accuracy > 0.3
    resumed = train_classifier(
        _config(tmp_path, "gpu", device="cuda", epochs=2, reuse_fixed_points=True),
        resume=True,
        log=lambda _: None,
    )
    assert [row["epoch"] for row in resumed.metrics] == [1, 2]
    assert resumed.test_accuracy > first.test_accuracy - 0.05


@pytest.mark.cuda
def test_conv_model_forward_on_cuda_matches_cpu():
    from equilibria.train.models import build_model

    torch.manual_seed(0)
    model = build_model(
        TrainConfig(model="conv", channels=8, solver="anderson", atol=1e-6, rtol=1e-6)
    )
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        on_cpu = model(images)
        on_gpu = model.to("cuda")(images.to("cuda")).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_real_ctrl_c_exits_130_with_a_resumable_checkpoint(tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time

    command = [
        sys.executable,
        "-m",
        "equilibria",
        "train",
        "mnist",
        "--subset",
        "256",
        "--test-subset",
        "100",
        "--batch-size",
        "32",
        "--epochs",
        "40",
        "--solver",
        "picard",
        "--threads",
        "1",
        "--quiet",
        "--no-plots",
        "--runs-dir",
        str(tmp_path),
        "--run-name",
        "sig",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(getattr(signal, signal_name))  # Ctrl-C, or a scheduler's SIGTERM
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "checkpoint saved" in err or "checkpoint saved" in _
    state = load_checkpoint(tmp_path / "sig" / "checkpoint.pt")
    assert state["epoch"] >= 1
    from equilibria.cli import main

    epochs = state["epoch"] + 1
    argv = ["train", "mnist", "--resume", "--run-name", "sig", "--runs-dir", str(tmp_path)]
    assert main([*argv, "--epochs", str(epochs)]) == 0
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1))


def test_a_looser_backward_tolerance_takes_fewer_vjps(tmp_path):
    # the adjoint solved to the forward's 1e-3 instead of GMRES's 1e-6
    rows = {}
    for name, rtol in (("tight", None), ("loose", 1e-3)):
        config = _config(tmp_path, name, epochs=1, subset=256, backward_rtol=rtol)
        rows[name] = train_classifier(config, log=lambda _: None).metrics[0]
    assert rows["loose"]["backward_nfe_mean"] < 0.8 * rows["tight"]["backward_nfe_mean"]
    assert rows["loose"]["test_accuracy"] > 0.3  # still learns (chance 0.1)
    config = json.loads((tmp_path / "loose" / "config.json").read_text())
    assert config["backward_rtol"] == 1e-3


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"backward_rtol": 0.0}, "backward_rtol"),
        ({"backward_rtol": 1e-3, "backward": "phantom"}, "Drop --backward-rtol"),
    ],
)
def test_bad_backward_rtol_names_the_option(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, "bad", **overrides).validate()


def test_mixed_precision_learns_like_float32(tmp_path):
    plain = train_classifier(_config(tmp_path, "fp32", epochs=1, rtol=4e-3), log=lambda _: None)
    mixed = train_classifier(
        _config(tmp_path, "bf16", epochs=1, rtol=4e-3, amp="bf16"), log=lambda _: None
    )
    assert mixed.test_accuracy > 0.5  # chance is 0.1
    assert abs(mixed.test_accuracy - plain.test_accuracy) < 0.05
    assert abs(mixed.metrics[0]["loss"] - plain.metrics[0]["loss"]) < 0.05
    assert mixed.metrics[0]["not_converged_share"] < 0.05
    assert json.loads((mixed.run_dir / "config.json").read_text())["amp"] == "bf16"
    # `equilibria evaluate` reads the run's precision from its config: same accuracy.
    from equilibria.train.evaluate_run import evaluate_run

    again = evaluate_run(mixed.run_dir, test_subset=300)
    assert again["accuracy"] == mixed.test_accuracy


def test_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path):
    values = dict(rtol=4e-3, amp="fp16")
    reference = train_classifier(_config(tmp_path, "ref", **values), log=lambda _: None)

    def interrupt(step: int) -> None:
        if step == 8:  # epoch 2, batch 2 of 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(_config(tmp_path, "cut", **values), on_step=interrupt, log=lambda _: None)
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the run
    resumed = train_classifier(_config(tmp_path, "cut", **values), resume=True, log=lambda _: None)
    assert _without_timing(resumed.metrics) == _without_timing(reference.metrics)
    a, b = _weights(reference.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_amp_needs_a_reachable_tolerance_and_a_solver_it_does_not_slow_down():
    with pytest.raises(ValueError, match=r"--amp bf16 .* Pass --rtol 4e-03 or larger"):
        TrainConfig(amp="bf16", rtol=1e-3, solver="anderson").validate()
    with pytest.raises(ValueError, match="unknown amp 'int8'"):
        TrainConfig(amp="int8").validate()
    with pytest.raises(ValueError, match="steady-state-tsit5.*Use --solver steady-state-implicit"):
        TrainConfig(amp="fp16", rtol=5e-4, solver="steady-state-tsit5").validate()
    TrainConfig(amp="fp16", rtol=5e-4, solver="steady-state-implicit").validate()


def test_checkpoint_written_before_a_config_field_existed_still_resumes(tmp_path):
    train_classifier(_config(tmp_path, "old", epochs=1), log=lambda _: None)
    path = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["amp"]  # as written before --amp existed
    del state["sha256"]  # (and before checkpoints carried a checksum)
    torch.save(state, path)
    resumed = train_classifier(_config(tmp_path, "old", epochs=2), resume=True, log=lambda _: None)
    assert [row["epoch"] for row in resumed.metrics] == [1, 2]


@pytest.mark.cuda
def test_fp16_run_on_cuda_learns(tmp_path):
    config = _config(tmp_path, "gpu-fp16", device="cuda", epochs=1, rtol=4e-3, amp="fp16")
    assert train_classifier(config, log=lambda _: None).test_accuracy > 0.5
