"""`normzoo run --nproc N`: real processes, gloo, DDP, the norms' statistics over the whole
batch; and a process that dies ends the run with an error naming it."""

from __future__ import annotations

import json
import sys
import time

import pytest

import normzoo
from normzoo.cli import main
from tests.conftest import install_fake_distribution

SMALL = ["--epochs", "1", "--train-subset", "1024", "--test-subset", "256", "--batch-size", "128",
         "--precise-stats", "2", "--no-progress"]  # fmt: skip


def run_directory(root):
    (directory,) = root.iterdir()
    return directory


def test_two_processes_train_like_one_on_the_same_batches(tmp_path, capsys):
    for nproc in ("1", "2"):
        assert main(["run", *SMALL, "--nproc", nproc, "--runs-dir", str(tmp_path / nproc)]) == 0
    one, two = (run_directory(tmp_path / n) for n in ("1", "2"))
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    assert json.loads((one / "config.json").read_text())["processes"] == 1
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert metrics[1]["status"] == "finished"
    (a,), (b,) = (m["epochs"] for m in metrics)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["test_acc"] == pytest.approx(a["test_acc"], abs=2 / 256)
    assert (two / "model.pt").exists() and (two / "curves.png").exists()
    assert "epoch  1:" in capsys.readouterr().out  # rank 0 reports, once


DIES_ON_RANK_1 = '''
    import os
    import torch
    import torch.distributed as dist
    import normzoo
    from torch import nn

    class DiesOnRank1(nn.Module):
        """Identity that kills its process on rank 1 at the third training batch."""

        def __init__(self, num_features, layout):
            super().__init__()
            self.num_features, self.layout, self.calls = num_features, layout, 0

        def forward(self, x):
            self.calls += self.training
            if self.training and self.calls == 3 and dist.is_initialized() and dist.get_rank() == 1:
                os._exit(3)
            return x

    @normzoo.hookimpl
    def normzoo_register_norms(register):
        register(normzoo.NormInfo(name="dies-on-rank-1", summary="test", layouts=("fc", "conv"),
                                  uses_batch_stats=False, factory=DiesOnRank1))
'''


def test_a_process_that_dies_ends_the_run_with_an_error_naming_it(
    tmp_path, monkeypatch, capsys, request
):
    site = install_fake_distribution(tmp_path / "site", "normzoo_dies", "normzoo_dies",
                                     DIES_ON_RANK_1, "dies")  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("NORMZOO_DIST_TIMEOUT", "30")
    normzoo.default_registry.cache_clear()  # this process checks the run first: it must see it
    request.addfinalizer(normzoo.default_registry.cache_clear)
    started = time.monotonic()
    status = main(["run", *SMALL, "--norm", "dies-on-rank-1", "--nproc", "2",
                   "--runs-dir", str(tmp_path / "runs")])  # fmt: skip
    assert status == 2 and time.monotonic() - started < 60
    error = capsys.readouterr().err
    assert "multi-process run failed: process 1 died" in error and "exit code 3" in error
    metrics = json.loads((run_directory(tmp_path / "runs") / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "process 1 died" in metrics["message"]
    sys.modules.pop("normzoo_dies", None)


def test_the_same_command_runs_under_torchrun(tmp_path):
    """torchrun starts the processes; normzoo finds the process group in the environment."""
    import os
    import subprocess

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*torchrun, "-m", "normzoo", "run", *SMALL, "--runs-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("epoch  1:") == 1  # rank 0 reports, once
    directory = run_directory(tmp_path)
    assert json.loads((directory / "config.json").read_text())["processes"] == 2
    assert json.loads((directory / "metrics.json").read_text())["status"] == "finished"
