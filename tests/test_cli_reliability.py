"""No silent wrong answers, no raw tracebacks: divergence exits 3, unconverged solves are
reported, bad devices/configs/paths get errors naming the argument or file and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from equilibria import plots
from equilibria.cli import _fresh_run_name, main
from equilibria.train.health import TrainingDiverged, blame_divergence, loss_explosion
from tiny_runs import TINY


def _cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _train(runs, *extra):
    return ["train", "mnist", *TINY, "--epochs", "1", "--runs-dir", runs, *extra]


@pytest.mark.filterwarnings("ignore:DEQ Implicit backward did not converge")
def test_lr_10_exits_3_with_the_fix_not_blaming_the_input(tmp_path, capsys):
    # lr 10: the loss explodes at batch 2 and the weights go NaN in its step (or, where the
    # solvers keep every value finite, the loss keeps growing); never "pass finite values"
    argv = [*_train(tmp_path, "--lr", "10", "--solver", "anderson"), "--batch-size", "64"]
    code, _, err = _cli(capsys, *argv)
    assert code == 3, err
    assert "at epoch 1, batch 2: training diverged" in err and "Lower --lr" in err
    assert "No checkpoint was written yet" in err and "pass finite values" not in err


def test_loss_explosion_criteria():
    assert loss_explosion(float("nan"), 2.3) == "the loss became nan"
    assert loss_explosion(float("inf"), None) == "the loss became inf"
    assert loss_explosion(2299.0, 2.3) is None  # at most 1000 times the first loss
    assert "grew to 2301, over 1000 times its first value 2.3" in loss_explosion(2301.0, 2.3)
    assert loss_explosion(1e6, None) is None  # the first batch: nothing to compare with


def test_nan_weights_stop_the_run_and_keep_the_last_good_checkpoint(
    tiny_run, capsys, monkeypatch
):
    before = (tiny_run / "checkpoint.pt").read_bytes()
    step = torch.optim.Adam.step

    def poisoned_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    code, _, err = _cli(capsys, "train", "mnist", "--resume", "--run-name", tiny_run.name,
                        "--runs-dir", tiny_run.parent, "--epochs", "3")
    assert code == 3 and "at epoch 3, batch 1" in err and "last good checkpoint" in err
    assert (tiny_run / "checkpoint.pt").read_bytes() == before


def test_overflowing_activations_are_reported_as_divergence(tmp_path):
    with pytest.raises(TrainingDiverged, match="activations became inf or NaN from finite"):
        with blame_divergence(1, 3, tmp_path):
            raise ValueError("x contains inf or NaN (samples [0]); pass finite values.")
    with pytest.raises(ValueError, match="unrelated"), blame_divergence(1, 3, tmp_path):
        raise ValueError("unrelated")


def test_unconverged_solves_are_in_the_epoch_line_and_warned(tmp_path, capsys):
    code, out, _ = _cli(capsys, *_train(tmp_path, "--max-steps", "2"))
    assert code == 0
    assert "not converged 100.0%" in out
    assert "warning: 100% of the training and 100% of the test solves did not converge" in out
    assert "--max-steps" in out and "--rtol" in out and "--solver" in out
    code, out, _ = _cli(capsys, *_train(tmp_path))  # converged: no warning
    assert "not converged 0.0%" in out and "warning" not in out


def test_cobweb_title_names_the_fixed_point_not_the_last_iterate(tmp_path, capsys, monkeypatch):
    titles = []
    save = plots._save

    def capture(fig, path):
        titles.append(fig.axes[0].get_title())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    code, out, _ = _cli(capsys, "cobweb", "--out", tmp_path / "c.png")
    assert code == 0 and titles == ["cobweb: fixed point x* = 0.739085"]
    assert "fixed point x* = 0.739085133" in out


def test_ctrl_c_after_the_command_finished_prints_no_traceback(tmp_path):
    # Ctrl-C while the interpreter shuts down (atexit, torch's teardown): the run stands
    script = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
        f"sys.argv = ['equilibria', 'cobweb', '--out', {str(tmp_path / 'c.png')!r}]\n"
        "from equilibria.cli import entry\n"
        "entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "fixed point x*" in done.stdout


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", "mnist", "--device", "banana"], ["device 'banana'", "cpu, cuda or cuda:N"]),
        (["train", "mnist", "--device", "cuda:abc"], ["device 'cuda:abc'"]),
        (["evaluate", "{run}", "--device", "banana"], ["--device 'banana'"]),
        (["train", "mnist", "--run-name", "a/b"], ["plain directory name", "--runs-dir"]),
        (["train", "mnist", "--run-name", ".."], ["plain directory name"]),
        (["train", "mnist", "--seed", str(2**70)], ["seed must be <= 2**32 - 1"]),
        (["evaluate", "{run}", "--test-subset", "20000"], ["--test-subset must be <= 10000"]),
        (["evaluate", "{tmp}"], ["is not a run directory"]),
        (["train", "mnist", "--resume", "--run-name", "nope", "--runs-dir", "{tmp}"],
         ["holds no run; nothing to continue"]),
        (["cobweb", "--out", "{tmp}/c.txt"], ["--out", "expected an image file name"]),
        (["cobweb", "--out", "{tmp}"], ["--out", "expected an image file name"]),
        (["train", "linear2x", "--out", "{run}/config.json"], ["--out", "cannot create"]),
        (["mechanics", "--out", "{run}/config.json"], ["--out", "cannot create"]),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(tiny_run, tmp_path, capsys, argv, needles):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [arg.format(run=tiny_run, tmp=empty) for arg in argv]
    code, _, err = _cli(capsys, *argv)
    assert code == 1 and all(needle in err for needle in needles), err


def test_evaluate_with_another_step_bound_and_tolerance(tiny_run, capsys):
    # More (or fewer) forward steps at test time: the checkpoint's weights, another solve.
    from equilibria.train.evaluate_run import evaluate_run

    config = (tiny_run / "config.json").read_text()
    own = evaluate_run(tiny_run, test_subset=50)
    one = evaluate_run(tiny_run, test_subset=50, max_steps=1)
    assert own["solve"]["max_steps"] == json.loads(config)["max_steps"]
    assert one["solve"] == {**own["solve"], "max_steps": 1}
    # one Picard step: f at z0 and once more, and (rtol 1e-3) no sample converged in it
    assert one["forward_nfe_mean"] == 2 and one["not_converged_share"] == 1.0
    assert own["forward_nfe_mean"] > 2 and own["not_converged_share"] < 1.0
    loose = evaluate_run(tiny_run, test_subset=50, rtol=0.5, atol=0.5)
    assert loose["solve"]["rtol"] == 0.5 and loose["forward_nfe_mean"] < own["forward_nfe_mean"]
    assert (tiny_run / "config.json").read_text() == config  # the run is not changed
    code, out, _ = _cli(capsys, "evaluate", tiny_run, "--test-subset", "50", "--max-steps", "1")
    assert code == 0 and "solved with max_steps 1," in out
    for option, value in (("--max-steps", "0"), ("--rtol", "-1"), ("--atol", "0")):
        with pytest.raises(SystemExit) as stop:
            _cli(capsys, "evaluate", tiny_run, option, value)
        assert stop.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_evaluate_on_a_gpu_this_machine_lacks(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _cli(capsys, "evaluate", tiny_run, "--device", "cuda")
    assert code == 1 and "CUDA is not available here; use --device cpu" in err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (lambda c: json.dumps({**c, "device": 5}), "device must be str, got int 5"),
        (lambda c: json.dumps({**c, "lr": "fast"}), "lr must be float, got str 'fast'"),
        (lambda c: json.dumps({**c, "epochs": 2.5}), "epochs must be int, got float 2.5"),
        (lambda c: json.dumps({**c, "optimizer": "sgd"}), "unknown keys ['optimizer']"),
        (lambda c: "{'model': 'seed'", "is not valid JSON"),
        (lambda c: "[1, 2]", "holds a JSON list, not an object"),
        (lambda c: "", "is empty"),
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_invalid_config_json_names_the_file_and_field(
    tiny_run, capsys, content, needle, command
):
    path = tiny_run / "config.json"
    path.write_text(content(json.loads(path.read_text())))
    if command == "evaluate":
        argv = ["evaluate", tiny_run]
    else:
        argv = ["train", "mnist", "--resume", "--run-name", tiny_run.name, "--runs-dir",
                tiny_run.parent]
    code, _, err = _cli(capsys, *argv)
    assert code == 1 and str(path) in err and needle in err, err


def test_automatic_run_names_do_not_collide_within_a_second(tmp_path, monkeypatch):
    monkeypatch.setattr("equilibria.cli.time.strftime", lambda _: "20260101-000000")
    names = []
    for _ in range(3):
        names.append(_fresh_run_name(str(tmp_path), "mnist-seed"))
        (tmp_path / names[-1]).mkdir()
    assert names == ["mnist-seed-20260101-000000", "mnist-seed-20260101-000000-2",
                     "mnist-seed-20260101-000000-3"]


def test_ctrl_c_during_the_last_evaluation_says_the_run_is_complete(tmp_path, capsys,
                                                                      monkeypatch):
    import signal

    from equilibria.train import loop

    real = loop.evaluate

    def evaluate_then_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # held by the loop until the epoch is saved
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_ctrl_c)
    code, out, err = _cli(capsys, *_train(tmp_path, "--run-name", "last"))
    assert code == 130 and "the run is complete and saved in" in out
    assert "Traceback" not in err and (tmp_path / "last" / "metrics.jsonl").exists()
