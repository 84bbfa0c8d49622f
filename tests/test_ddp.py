"""DistributedDataParallel under torchrun: 2 CPU processes (gloo) finish and agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _mnist_args(tmp_path, *extra):
    """`equilibria train mnist` on a small subset, quiet, runs under tmp_path."""
    return [
        "-m", "equilibria", "train", "mnist", "--subset", "256", "--test-subset", "200",
        "--batch-size", "32", "--epochs", "1", "--solver", "picard", "--lr", "1e-3",
        "--quiet", "--runs-dir", str(tmp_path), *extra,
    ]


def _torchrun(tmp_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        *_mnist_args(tmp_path, *extra),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_two_cpu_processes_finish_and_agree(tmp_path):
    done = _torchrun(tmp_path, "--run-name", "ddp", "--reuse-fixed-points")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    rank0 = json.loads((run_dir / "rank0_summary.json").read_text())
    rank1 = json.loads((run_dir / "rank1_summary.json").read_text())
    # DDP keeps the replicas identical; the metrics are reduced over both ranks
    assert rank0["parameter_checksum"] == rank1["parameter_checksum"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in rank0["metrics"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in rank1["metrics"]]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["test_accuracy"] > 0.3  # 4 steps; chance is 0.1
    # each rank trained on half of the 256 images: the epoch's counts cover all of them
    assert "test accuracy" in done.stdout and done.stdout.count("run directory") == 1
    assert (run_dir / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_ddp_resume_continues(tmp_path):
    assert _torchrun(tmp_path, "--run-name", "r").returncode == 0
    done = _torchrun(tmp_path, "--run-name", "r", "--resume", "--epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


# Run under torchrun: the same run as `_torchrun(..., "--reuse-fixed-points")` would make, but
# rank 1 alone gets SIGTERM after the 2nd of its 4 optimizer steps (as when torchrun forwards a
# Ctrl-C, the ranks see the signal at different moments; here rank 0 never sees one).
_SIGNALLED_RUN = """
import os, signal, sys
from equilibria.train.config import TrainConfig
from equilibria.train.loop import train_classifier

def on_step(step):
    if step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)

config = TrainConfig(subset=256, test_subset=200, batch_size=32, epochs=1, solver="picard",
                     lr=1e-3, quiet=True, runs_dir=sys.argv[1], run_name="cut",
                     reuse_fixed_points=True)
try:
    train_classifier(config, on_step=on_step)
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.slow
def test_ddp_signal_mid_epoch_checkpoints_and_resumes_exactly(tmp_path):
    whole = _torchrun(tmp_path, "--run-name", "whole", "--reuse-fixed-points")
    assert whole.returncode == 0, whole.stderr[-3000:]
    script = tmp_path / "signalled.py"
    script.write_text(_SIGNALLED_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(script), str(tmp_path)]
    cut = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert cut.returncode != 0  # torchrun reports the interrupted workers
    assert "checkpoint saved" in cut.stdout, cut.stdout[-2000:] + cut.stderr[-3000:]
    from equilibria.train.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    # both ranks stopped after the same step, and each rank's own state was kept
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2)
    assert len(state["ranks"]) == 2 and state["metrics"] == []
    # mid-epoch, each rank's RNG and partial sums are its own: one process cannot continue it
    alone = subprocess.run(
        [sys.executable, *_mnist_args(tmp_path, "--run-name", "cut", "--reuse-fixed-points",
                                      "--resume")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert alone.returncode != 0 and "--nproc-per-node 2" in alone.stderr, alone.stderr[-2000:]
    resumed = _torchrun(tmp_path, "--run-name", "cut", "--reuse-fixed-points", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert rows("cut") == rows("whole")
