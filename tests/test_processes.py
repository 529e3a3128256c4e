"""`normzoo run --nproc N`: real processes, gloo, DDP, the norms' statistics over the whole
batch; and a process that dies ends the run with an error naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import normzoo
from normzoo.cli import main
from tests.conftest import install_fake_distribution

SMALL = ["--epochs", "1", "--train-subset", "1024", "--test-subset", "256", "--batch-size", "128",
         "--precise-stats", "2", "--no-progress"]  # fmt: skip


def run_directory(root):
    (directory,) = root.iterdir()
    return directory


def test_two_processes_train_like_one_on_the_same_batches(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the launcher sees fewer cores than processes
    for nproc in ("1", "2"):
        assert main(["run", *SMALL, "--nproc", nproc, "--runs-dir", str(tmp_path / nproc)]) == 0
    out, err = capsys.readouterr()
    assert "warning: --nproc 2 on 1 cores: the processes take turns" in err
    one, two = (run_directory(tmp_path / n) for n in ("1", "2"))
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    assert json.loads((one / "config.json").read_text())["processes"] == 1
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert metrics[1]["status"] == "finished"
    (a,), (b,) = (m["epochs"] for m in metrics)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["test_acc"] == pytest.approx(a["test_acc"], abs=2 / 256)
    assert (two / "model.pt").exists() and (two / "curves.png").exists()
    assert "epoch  1:" in out


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


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children |= {int(child) for child in task.read_text().split()}
    return children


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("when", ["starting", "training"])
def test_sigterm_to_the_launcher_stops_every_process_and_records_the_run(tmp_path, when):
    """Before, SIGTERM killed the launcher alone: its processes trained on as orphans and
    finished a run that the user had stopped."""
    process = subprocess.Popen(
        [
            sys.executable, "-m", "normzoo", "run", "--nproc", "2", "--norm", "batchnorm",
            "--epochs", "50", "--train-subset", "4096", "--test-subset", "128",
            "--batch-size", "128", "--precise-stats", "0", "--no-progress",
            "--runs-dir", str(tmp_path),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NORMZOO_DIST_TIMEOUT": "60"},
    )  # fmt: skip
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    try:
        if when == "training":
            first = process.stdout.readline()
            assert first.startswith("epoch  1: train loss"), (first, process.communicate())
        else:
            deadline = time.monotonic() + 120
            while len(_children(process.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        workers = _children(process.pid)
        assert len(workers) >= 2  # the two processes (and torch's resource tracker)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate()
    finally:
        watchdog.cancel()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "normzoo: terminated by SIGTERM after " in err
    time.sleep(1)
    assert not [pid for pid in workers if _alive(pid)]
    runs = list(tmp_path.iterdir())
    if when == "training" or runs:  # while starting, rank 0 may not have made it yet
        metrics = json.loads((runs[0] / "metrics.json").read_text())
        assert metrics["status"] == "interrupted", metrics
        assert metrics["message"].startswith("terminated by SIGTERM after ")
        assert len(metrics["epochs"]) < 50
