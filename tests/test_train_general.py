"""The general training app (issue 12): any data set x model pair through one loop."""

from __future__ import annotations

import pytest
import torch

from equilibria.cli import main
from equilibria.data import fashion_mnist
from equilibria.train.config import TrainConfig
from equilibria.train.loop import _penalised, train_classifier

needs_fashion = pytest.mark.skipif(
    not fashion_mnist.DEBIAN_DIR.is_dir(),
    reason="Fashion-MNIST is not installed (make installs the Debian package where apt is)",
)


def _config(tmp_path, name: str, **changes) -> TrainConfig:
    values = dict(dataset="fashion-mnist", model="mdeq", channels=8, solver="anderson",
                  subset=1024, test_subset=500, epochs=2, batch_size=64, lr=3e-3, rtol=1e-3,
                  max_steps=30, runs_dir=str(tmp_path), run_name=name, quiet=True,
                  plots=False, threads=1)
    values.update(changes)
    return TrainConfig(**values)


@needs_fashion
@pytest.mark.parametrize("solver", ["anderson", "steady-state-implicit"])
def test_multiscale_deq_learns_fashion_mnist_on_a_subset(tmp_path, solver):
    result = train_classifier(_config(tmp_path, solver, solver=solver), log=lambda _: None)
    assert result.test_accuracy > 0.5  # chance is 0.1
    last = result.metrics[-1]
    assert last["not_converged_share"] < 0.05


@needs_fashion
def test_multiscale_resume_equals_uninterrupted(tmp_path):
    small = dict(subset=256, test_subset=100, reuse_fixed_points=True, dropout=0.1,
                 augment="shift-flip")
    whole = train_classifier(_config(tmp_path, "whole", **small), log=lambda _: None)
    train_classifier(_config(tmp_path, "split", epochs=1, **small), log=lambda _: None)
    resumed = train_classifier(_config(tmp_path, "split", **small), resume=True,
                               log=lambda _: None)

    def without_timing(rows):
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]

    assert without_timing(resumed.metrics) == without_timing(whole.metrics)
    a = torch.load(whole.run_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_jacobian_penalty_schedule():
    config = TrainConfig(jac_penalty=1.0, jac_every=3, jac_until_epoch=2)
    steps = [(epoch, batch) for epoch in range(3) for batch in range(4)]
    on = [(e, b) for e, b in steps if _penalised(config, e, b, batches_per_epoch=4)]
    assert on == [(0, 0), (0, 3), (1, 2)]  # global steps 0, 3, 6; none in epoch 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "mdeq", "--scales", "4"], "scales must be 2 or 3"),
        (["--model", "mdeq", "--dropout", "1"], "dropout must be in [0, 1)"),
        (["--model", "mdeq", "--channels", "12"], "channels must be a multiple of 8"),
        (["--jac-every", "2"], "pass --jac-penalty"),
        (["--solver", "reversible", "--backward", "reversible", "--compact"],
         "drop --compact"),
    ],
)
def test_bad_options_are_refused_before_training(tmp_path, capsys, argv, message):
    code = main(["train", "fashion-mnist", *argv, "--runs-dir", str(tmp_path), "--quiet"])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_an_unknown_data_set_or_model_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "cifar"])
    assert caught.value.code == 2
    assert "fashion-mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "fashion-mnist", "--model", "resnet"])
    assert "mdeq" in capsys.readouterr().err


@needs_fashion
def test_resume_on_another_data_set_is_refused(tmp_path, capsys):
    base = ["--model", "seed", "--subset", "128", "--test-subset", "50", "--epochs", "1",
            "--solver", "anderson", "--runs-dir", str(tmp_path), "--run-name", "r",
            "--quiet", "--no-plots", "--threads", "1"]
    assert main(["train", "fashion-mnist", *base]) == 0
    capsys.readouterr()
    assert main(["train", "mnist", *base, "--resume", "--epochs", "2"]) == 1
    assert "equilibria train fashion-mnist --resume" in capsys.readouterr().err


def test_compact_reaches_the_deq():
    from equilibria.train.models import build_model

    config = TrainConfig(dataset="fashion-mnist", model="mdeq", channels=8, compact=True)
    assert build_model(config.validate()).deq.compact
    assert not build_model(TrainConfig(model="conv", channels=8).validate()).deq.compact
