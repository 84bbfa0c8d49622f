"""A finished two-epoch MNIST run on 128 images, trained once per session; each test that
damages or resumes it works on its own copy (`tiny_run`)."""

from __future__ import annotations

import shutil

import pytest

# a quick Picard run on a tiny subset (a second or two once MNIST is in memory)
TINY = ["--subset", "128", "--test-subset", "50", "--batch-size", "32", "--solver", "picard",
        "--quiet", "--no-plots", "--threads", "1"]


@pytest.fixture(scope="session")
def tiny_run_original(tmp_path_factory):
    from equilibria.cli import main

    runs = tmp_path_factory.mktemp("tiny-runs")
    assert main(["train", "mnist", *TINY, "--epochs", "2", "--runs-dir", str(runs),
                 "--run-name", "base"]) == 0
    return runs / "base"


@pytest.fixture
def tiny_run(tiny_run_original, tmp_path):
    shutil.copytree(tiny_run_original, tmp_path / "r")
    return tmp_path / "r"
