"""Run directories and their files: where they may go, their permissions, strict JSON."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from normzoo.harness.runs import (
    RunDirectory,
    RunFilesError,
    atomic_write_bytes,
    atomic_write_json,
    check_runs_root,
)


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one afterwards."""
    old = os.umask(0o022)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_follow_the_umask_not_mkstemps_0600(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "metrics.json"
    atomic_write_bytes(path, b"{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert not list(tmp_path.glob(".*.tmp"))


def test_json_with_a_non_finite_number_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(RunFilesError, match=r"epochs\[1\]\.train_loss is not a finite number"):
        atomic_write_json(path, {"epochs": [{"train_loss": 1.0}, {"train_loss": float("nan")}]})
    assert not path.exists() and not list(tmp_path.iterdir())
    atomic_write_json(path, {"lr": 1.0})
    assert path.read_text() == '{\n  "lr": 1.0\n}\n'


def test_a_runs_dir_that_is_a_file_or_under_one_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(RunFilesError, match=f"--runs-dir {afile} is a file; pass another"):
        RunDirectory.create(afile, "batchnorm")
    with pytest.raises(RunFilesError, match=f"is under {afile}, which is a file"):
        RunDirectory.create(afile / "runs" / "deeper", "batchnorm")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_runs_dir_that_cannot_be_written_is_named(tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        try:
            with pytest.raises(RunFilesError, match=f"{locked} is not writable"):
                check_runs_root(locked / "runs")
        finally:
            locked.chmod(0o755)
    elif sys.platform.startswith("linux"):
        # root writes anywhere chmod allows; /proc refuses new directories even to root
        with pytest.raises(RunFilesError, match="cannot create a run directory under"):
            RunDirectory.create("/proc/normzoo-test-runs", "batchnorm")
    else:
        pytest.skip("running as root on a system without /proc")


def test_tilde_in_the_runs_dir_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    directory = RunDirectory.create("~/runs", "layer norm")
    assert directory.path.parent == tmp_path / "runs"
    assert directory.path.name.endswith("-layer_norm")
    assert check_runs_root("~/elsewhere") == tmp_path / "elsewhere"
    assert not (tmp_path / "elsewhere").exists()  # checking creates nothing


def test_metrics_need_a_known_status(tmp_path):
    directory = RunDirectory(Path(tmp_path))
    with pytest.raises(ValueError, match="status must be one of"):
        directory.write_metrics({"status": "done", "epochs": []})
