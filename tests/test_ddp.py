"""DistributedDataParallel under torchrun: 2 CPU processes (gloo) finish and agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _torchrun(tmp_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "equilibria",
        "train",
        "mnist",
        "--subset",
        "256",
        "--test-subset",
        "200",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--solver",
        "picard",
        "--lr",
        "1e-3",
        "--quiet",
        "--runs-dir",
        str(tmp_path),
        *extra,
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
