"""Which code made a run: the git revision of normzoo's source tree, whether that tree had
uncommitted changes, and normzoo's version.

A comparison's cache key covers each norm's declared version, not its code: a change that
alters a norm's numbers without a version bump leaves the old results under the same key.
Every run records the code that made it, so a result that does not reproduce can be traced to
its revision, and one made from a modified tree (which no revision reproduces) says so.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import normzoo

#: The folders of the source tree whose uncommitted changes can alter a run's numbers: the
#: package and the bundled plugins (``pyproject.toml``'s package-dir).
SOURCE_FOLDERS = ("normzoo", "plugins")
#: Seconds a git command may take before the revision is given up as unknown.
GIT_TIMEOUT = 10
#: Variables with which git would answer for another repository than the package's (set, for
#: example, inside a git hook).
_GIT_REDIRECTS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR")


@dataclass(frozen=True)
class CodeRevision:
    """The code a run was made with.

    ``revision`` is the commit checked out (``None`` when normzoo does not run from a git
    checkout, or git is missing); ``modified`` whether tracked files under
    :data:`SOURCE_FOLDERS` had uncommitted changes (``None`` when the revision is unknown);
    ``normzoo_version`` the installed package's version.
    """

    revision: str | None
    modified: bool | None
    normzoo_version: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _git(directory: Path, *arguments: str) -> str | None:
    """git's output in ``directory``, stripped; ``None`` when git is missing, fails or hangs."""
    environment = {k: v for k, v in os.environ.items() if k not in _GIT_REDIRECTS}
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *arguments], capture_output=True, text=True,
            timeout=GIT_TIMEOUT, env=environment, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def describe_source(package_directory: Path) -> CodeRevision:
    """The revision of the source tree whose package folder is ``package_directory``.

    The tree counts only when ``package_directory`` sits at the top of its git checkout (the
    repository's ``normzoo/``): a package installed into a virtual environment that happens to
    lie inside some other repository has no revision, rather than that repository's.
    """
    unknown = CodeRevision(None, None, normzoo.__version__)
    top = _git(package_directory, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != package_directory.resolve().parent:
        return unknown
    head = _git(Path(top), "rev-parse", "HEAD")
    changes = _git(
        Path(top), "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_FOLDERS
    )
    if head is None or changes is None:  # a repository without a commit yet
        return unknown
    return CodeRevision(head, bool(changes), normzoo.__version__)


@cache
def code_revision() -> CodeRevision:
    """The code of this process's normzoo, asked of git once per process: it cannot change
    under a running process without the process running stale code anyway."""
    return describe_source(Path(normzoo.__file__).parent)
