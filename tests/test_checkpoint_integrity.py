"""Checkpoints prove their integrity: damaged, untrusted, incomplete or non-finite ones are
refused with a message naming the file; a full disk keeps the previous one; the logs are
rebuilt from the checkpoint; a killed writer's temporary files are cleaned up."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from equilibria.cli import main
from equilibria.train import checkpoint as checkpoint_module
from equilibria.train import loop
from equilibria.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from tiny_runs import TINY


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def _evaluate(capsys, run_dir):
    return _cli(capsys, "evaluate", str(run_dir), "--test-subset", "50")


def _resume(capsys, run_dir, epochs=2):
    return _cli(capsys, "train", "mnist", "--resume", "--run-name", run_dir.name, "--runs-dir",
                str(run_dir.parent), "--epochs", str(epochs), "--quiet", "--no-plots")


def _negate_floats_on_disk(path, count=1000):
    """Flip the sign of `count` float32 values inside the largest tensor record of the file
    itself (the zip container stores tensors uncompressed and checks no CRC on load)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[record.header_offset + 26 :][:4])
    start = record.header_offset + 30 + name_len + extra_len
    values = np.frombuffer(bytes(raw[start : start + 4 * count]), dtype=np.float32)
    raw[start : start + 4 * count] = (-values).tobytes()
    path.write_bytes(bytes(raw))


def _resave(path, edit, keep_checksum=True):
    """Rewrite a checkpoint after `edit(state)`: with a fresh checksum (as a tool writing
    valid checkpoints would), or without one (as equilibria did before checksums)."""
    state = torch.load(path, weights_only=True)
    edit(state)
    if keep_checksum:
        del state["sha256"]
        save_checkpoint(path, state)
    else:
        state.pop("sha256", None)
        torch.save(state, path)


def test_flipped_weights_are_refused_by_evaluate_and_resume(tiny_run, capsys):
    path = tiny_run / "checkpoint.pt"
    _negate_floats_on_disk(path)
    torch.load(path, weights_only=True)  # torch alone does not notice
    for code, text in (_evaluate(capsys, tiny_run), _resume(capsys, tiny_run, epochs=3)):
        assert code == 1 and "fails its integrity check" in text and str(path) in text


def test_checkpoint_without_checksum_loads_with_a_note(tiny_run, capsys):
    _resave(tiny_run / "checkpoint.pt", lambda state: None, keep_checksum=False)
    code, text = _evaluate(capsys, tiny_run)
    assert code == 0 and "written before checkpoints carried a checksum" in text
    code, text = _resume(capsys, tiny_run, epochs=3)
    assert code == 0 and "carried a checksum" in text
    assert "sha256" in load_checkpoint(tiny_run / "checkpoint.pt")  # the next one carries it


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch equilibria_checkpoint_pwned",))


def test_malicious_checkpoint_is_refused_without_running_code(tiny_run, capsys, monkeypatch):
    monkeypatch.chdir(tiny_run)
    torch.save({"format": checkpoint_module.CHECKPOINT_FORMAT, "x": _Payload()},
               tiny_run / "checkpoint.pt")
    code, text = _evaluate(capsys, tiny_run)
    assert code == 1 and "not a trusted equilibria checkpoint" in text
    assert "Do not load it with torch.load(weights_only=False)" in text
    assert "two options" not in text  # torch's advice, which would run the payload
    assert not (tiny_run / "equilibria_checkpoint_pwned").exists()


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04" + b"0" * 99])
def test_a_file_that_is_not_a_checkpoint_is_named(tiny_run, capsys, content):
    (tiny_run / "checkpoint.pt").write_bytes(content)
    code, text = _evaluate(capsys, tiny_run)
    assert code == 1 and "truncated or damaged, or not a checkpoint" in text
    assert str(tiny_run / "checkpoint.pt") in text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda state: state.pop("optimizer"), "holds no optimizer state"),
        (
            lambda state: state["optimizer"]["state"][0].update(
                exp_avg=torch.zeros(3, 3), exp_avg_sq=torch.zeros(3, 3)
            ),
            "exp_avg of parameter 0 has shape (3, 3)",
        ),
        (lambda state: state.pop("epoch"), "lacks a valid 'epoch' entry"),
        (lambda state: state.update(batch_in_epoch=-1), "lacks a valid 'batch_in_epoch'"),
    ],
)
def test_resume_with_incomplete_optimizer_state_is_refused(tiny_run, capsys, edit, message):
    _resave(tiny_run / "checkpoint.pt", edit)
    code, text = _resume(capsys, tiny_run, epochs=3)
    assert code == 1 and message in text and str(tiny_run / "checkpoint.pt") in text


def test_nonfinite_weights_are_blamed_on_the_checkpoint(tiny_run, capsys):
    def poison(state):
        name = next(iter(state["model"]))
        state["model"][name] = torch.full_like(state["model"][name], float("nan"))

    _resave(tiny_run / "checkpoint.pt", poison)
    for code, text in (_evaluate(capsys, tiny_run), _resume(capsys, tiny_run, epochs=3)):
        assert code == 1 and "are not finite" in text
        assert str(tiny_run / "checkpoint.pt") in text
        assert "pass finite values" not in text


def test_full_disk_keeps_the_previous_checkpoint(tiny_run, monkeypatch):
    path = tiny_run / "checkpoint.pt"
    before = path.read_bytes()
    full = tiny_run / "to-dev-full"
    full.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    monkeypatch.setattr(checkpoint_module, "_temporary_path", lambda _: full)
    with pytest.raises(CheckpointError, match="no space left on the device holding") as error:
        save_checkpoint(path, torch.load(path, weights_only=True))
    assert str(path) in str(error.value) and "previous checkpoint there is intact" in str(
        error.value
    )
    assert path.read_bytes() == before and not full.exists()


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = tmp_path / f".checkpoint.pt.tmp{int(finished.stdout)}"
    live = tmp_path / f".checkpoint.pt.tmp{os.getppid()}"  # our parent is running
    for path in (dead, live):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


def test_resume_cleans_stale_temporaries(tiny_run, capsys):
    stale = tiny_run / ".checkpoint.pt.tmp999999999"
    stale.write_bytes(b"half a checkpoint")
    code, text = _resume(capsys, tiny_run)
    assert code == 0 and not stale.exists() and f"removed {stale}" in text


def _truncate_logs(run_dir):
    """What kill -9 right after the final checkpoint's rename leaves: logs a row short."""
    for name, keep in (("metrics.jsonl", 1), ("steps.jsonl", 1)):
        lines = (run_dir / name).read_text().splitlines(keepends=True)
        (run_dir / name).write_text("".join(lines[:keep]))


@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_logs_are_rebuilt_from_the_checkpoint(tiny_run, capsys, command):
    full = {name: (tiny_run / name).read_text() for name in ("metrics.jsonl", "steps.jsonl")}
    assert len(full["metrics.jsonl"].splitlines()) == 2
    _truncate_logs(tiny_run)
    rebuild = _resume if command == "resume" else _evaluate
    code, text = rebuild(capsys, tiny_run)
    assert code == 0 and "rewritten from the checkpoint" in text
    assert {name: (tiny_run / name).read_text() for name in full} == full


def test_resume_with_fewer_epochs_than_trained_is_refused(tiny_run, capsys):
    code, text = _resume(capsys, tiny_run, epochs=1)
    assert code == 1 and "already trained 2 epochs" in text and "--epochs 3" in text
    assert json.loads((tiny_run / "config.json").read_text())["epochs"] == 2


def test_resume_without_config_json_uses_the_checkpoint(tiny_run, capsys):
    (tiny_run / "config.json").unlink()
    code, text = _resume(capsys, tiny_run, epochs=3)
    assert code == 0 and "config.json is missing: using the configuration in" in text
    assert json.loads((tiny_run / "config.json").read_text())["epochs"] == 3


def test_evaluate_without_config_json_uses_the_checkpoint(tiny_run, capsys):
    (tiny_run / "config.json").unlink()
    code, text = _evaluate(capsys, tiny_run)
    assert code == 0 and "config.json is missing: using the configuration in" in text


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in equilibria catches it, so no code of its runs after."""


def test_kill_after_the_final_checkpoint_is_repaired_by_resume(tmp_path, capsys, monkeypatch):
    real = loop.write_jsonl

    def killed_at_the_last_log(path, rows):
        # the final checkpoint is renamed into place, metrics.jsonl still has epoch 1 only
        if path.name == "metrics.jsonl" and rows[-1]["epoch"] == 2:
            raise _Killed
        real(path, rows)

    monkeypatch.setattr(loop, "write_jsonl", killed_at_the_last_log)
    argv = ["train", "mnist", *TINY, "--epochs", "2", "--runs-dir", tmp_path, "--run-name", "k"]
    with pytest.raises(_Killed):
        main([str(arg) for arg in argv])
    monkeypatch.setattr(loop, "write_jsonl", real)
    run_dir = tmp_path / "k"
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["epoch"] == 2 and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    code, text = _resume(capsys, run_dir, epochs=2)
    assert code == 0 and "has finished its 2 epochs" in text and "rewritten" in text
    for name, rows in (("metrics.jsonl", state["metrics"]), ("steps.jsonl", state["steps"])):
        logged = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
        assert logged == rows and logged[-1]["epoch"] == 2


def test_resume_of_a_run_whose_checkpoint_is_gone_says_so(tiny_run, capsys):
    (tiny_run / "checkpoint.pt").unlink()
    code, text = _resume(capsys, tiny_run, epochs=3)
    assert code == 1 and "has trained epochs but no checkpoint.pt" in text
