"""Every run records the code that made it: the git revision of normzoo's source tree, whether
the tree was modified, and normzoo's version; none of it enters a comparison's cache key."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import normzoo
from normzoo.compare.cache import resolved_config
from normzoo.harness.config import RunConfig
from normzoo.harness.launch import launch
from normzoo.harness.revision import CodeRevision, code_revision, describe_source

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

TINY = dict(epochs=1, train_subset=256, test_subset=128, precise_stats=0, device="cpu")


def git(directory: Path, *arguments: str) -> str:
    identity = ("-c", "user.name=normzoo tests", "-c", "user.email=tests@normzoo.invalid")
    done = subprocess.run(
        ["git", *identity, "-C", str(directory), *arguments],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git repository shaped like normzoo's source tree, one commit in."""
    root = tmp_path / "repository"
    for name in ("normzoo/norm.py", "plugins/plugin.py", "README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x = 1\n")
    git(root, "init", "--quiet")
    git(root, "add", ".")
    git(root, "commit", "--quiet", "-m", "first")
    return root


def test_a_runs_metrics_record_the_code_that_made_it(tmp_path):
    result = launch(RunConfig(norm="none", runs_dir=str(tmp_path), **TINY), progress=False)
    metrics = json.loads((result.directory.path / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["code"] == code_revision().as_dict()
    assert metrics["code"]["normzoo_version"] == normzoo.__version__


@needs_git
def test_the_modified_flag_follows_uncommitted_changes_to_the_sources(checkout):
    package = checkout / "normzoo"
    clean = describe_source(package)
    assert clean == CodeRevision(git(checkout, "rev-parse", "HEAD"), False, normzoo.__version__)
    (checkout / "README.md").write_text("prose\n")  # outside the sources: not the code
    (package / "new.py").write_text("y = 2\n")  # untracked: not part of any revision
    assert describe_source(package).modified is False
    (checkout / "plugins/plugin.py").write_text("x = 2\n")
    assert describe_source(package).modified is True
    git(checkout, "commit", "--quiet", "-am", "second")
    committed = describe_source(package)
    assert committed.modified is False and committed.revision != clean.revision


@needs_git
def test_no_revision_outside_a_checkout_of_the_source_tree(tmp_path, checkout):
    plain = tmp_path / "plain" / "normzoo"
    plain.mkdir(parents=True)
    assert describe_source(plain) == CodeRevision(None, None, normzoo.__version__)
    # installed into a virtual environment inside some other repository: not its revision
    installed = checkout / ".venv" / "site-packages" / "normzoo"
    installed.mkdir(parents=True)
    assert describe_source(installed).revision is None


@needs_git
def test_no_revision_without_git(checkout, monkeypatch):
    monkeypatch.setenv("PATH", str(checkout / "no-programs-here"))
    assert describe_source(checkout / "normzoo").revision is None


def test_the_code_stays_out_of_the_cache_key():
    resolved = resolved_config(RunConfig(norm="pit", seed=3))
    assert not ({"code"} | set(CodeRevision.__dataclass_fields__)) & set(resolved)
