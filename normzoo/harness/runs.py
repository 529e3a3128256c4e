"""A run directory: the config, per-epoch metrics, final weights and the curves, written safely.

Every file is written to a temporary name in the same directory and then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so an interrupted or crashed run leaves
the previous complete version of each file, never a half-written one. Files get the permissions
any other file the user creates would get (``0o666`` less the umask), and JSON is strict: a NaN
or infinity is an error naming its key, never a bare ``NaN`` that other JSON readers reject.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normzoo.errors import NormzooError
from normzoo.harness.revision import CodeRevision

CONFIG = "config.json"
METRICS = "metrics.json"
WEIGHTS = "model.pt"
CURVES = "curves.png"
#: The values of ``status`` in ``metrics.json``; ``running`` only while the process lives.
STATUSES = ("running", "finished", "diverged", "failed", "interrupted")


class RunFilesError(NormzooError):
    """The runs directory is unusable, or a file of a run could not be written.

    ``directory`` is the run directory when the error came after it was created (a file of
    the run could not be written: a full disk, permissions), ``None`` when it came before
    (bad input, such as an unusable ``--runs-dir``).
    """

    def __init__(self, message: str, directory: Path | None = None) -> None:
        super().__init__(message)
        self.directory = directory


def _umask() -> int:
    """The process's umask. ``os.umask`` can only be read by setting it, so set it back."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    ``mkstemp`` creates the temporary file with mode ``0o600`` (it must, to be safe in shared
    directories); the result files are meant to be shared like any other output, so the file
    gets ``0o666`` less the umask before it is renamed into place. Raises
    :class:`RunFilesError` naming the file on any OS error (disk full, permissions).
    """
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise RunFilesError(f"cannot write {path}: {error.strerror or error}") from error
        raise


def find_non_finite(value: Any, where: str = "") -> str | None:
    """The dotted key of the first NaN or infinite float in ``value`` (``None`` if none).

    JSON has no NaN or infinity; ``json.dumps`` would write bare ``NaN`` that strict readers
    reject, or with ``allow_nan=False`` fail without saying which value is at fault.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    if isinstance(value, dict):
        items = ((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for key, item in items:
        found = find_non_finite(item, key)
        if found is not None:
            return found
    return None


def json_bytes(value: Any) -> bytes:
    """``value`` as indented, strict JSON; :class:`RunFilesError` names a non-finite number."""
    bad = find_non_finite(value)
    if bad is not None:
        raise RunFilesError(f"{bad} is not a finite number; JSON cannot hold it")
    return (json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented strict JSON, atomically."""
    atomic_write_bytes(path, json_bytes(value))


def check_runs_root(root: Path | str) -> Path:
    """The expanded ``root``, after checking that run directories can be created under it.

    Runs before the data are loaded and the model is probed, so a mistyped ``--runs-dir``
    costs nothing and creates nothing. Checks what can be known without writing: ``root``
    (or its nearest existing ancestor) is a directory that this user may write to. Raises
    :class:`RunFilesError` naming the path.
    """
    root = Path(root).expanduser()
    existing = root
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail
            break
        existing = existing.parent
    hint = "pass another --runs-dir"
    if existing.is_symlink() and not existing.exists():
        raise RunFilesError(f"--runs-dir {root}: {existing} is a broken symbolic link; {hint}")
    if not existing.is_dir():
        where = "is a file" if existing == root else f"is under {existing}, which is a file"
        raise RunFilesError(f"--runs-dir {root} {where}; {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFilesError(f"--runs-dir {root}: {existing} is not writable; {hint}")
    return root


class RunDirectory:
    """The files of one run under ``path``; ``code``, when given, is the code that made the
    run, recorded as ``code`` in every ``metrics.json`` (the launcher passes it, and the same
    object reaches the processes of a multi-process run)."""

    def __init__(self, path: Path, code: CodeRevision | None = None) -> None:
        self.path = path
        self.code = code

    @classmethod
    def create(cls, root: Path | str, label: str, code: CodeRevision | None = None) -> RunDirectory:
        """A new directory ``root/<YYYYmmdd-HHMMSS>-<label>[-k]`` that did not exist before,
        for a run made by ``code``.

        ``~`` in ``root`` is expanded (``--runs-dir=~/runs`` reaches us unexpanded). Raises
        :class:`RunFilesError` naming ``root`` when it cannot be created or written to.
        """
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        root = check_runs_root(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            for attempt in range(1000):
                path = root / (f"{stamp}-{safe}" + (f"-{attempt}" if attempt else ""))
                try:
                    path.mkdir()
                except FileExistsError:
                    continue
                return cls(path, code)
        except OSError as error:
            raise RunFilesError(
                f"cannot create a run directory under --runs-dir {root}: "
                f"{error.strerror or error}; pass another --runs-dir"
            ) from error
        raise RunFilesError(f"could not create a fresh run directory under {root}")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A :class:`RunFilesError` from the block carries this directory."""
        try:
            yield
        except RunFilesError as error:
            if error.directory is None:
                error.directory = self.path
            raise

    def write_config(self, config: dict[str, Any]) -> None:
        """Write ``config.json``."""
        with self._writing():
            atomic_write_json(self.path / CONFIG, config)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json``; its ``status`` must be one of :data:`STATUSES`."""
        if metrics.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {metrics.get('status')!r}")
        with self._writing():
            atomic_write_json(self.path / METRICS, metrics)

    def record(
        self,
        status: str,
        epochs: list[Any],
        message: str = "",
        title: str = "",
        warning: str = "",
    ) -> None:
        """Write ``metrics.json`` with ``status``, ``message`` and the metrics of the finished
        ``epochs`` (objects with ``as_dict()``), and the curves when there is an epoch.

        ``warning``, when given, is written as the field ``warning``: a run that finished but
        whose result should not be read as a normal one (e.g. accuracy at chance level). The
        field ``code`` holds :attr:`code` when the directory has it."""
        rows = [epoch.as_dict() for epoch in epochs]
        metrics: dict[str, Any] = {"status": status, "message": message}
        if warning:
            metrics["warning"] = warning
        if self.code is not None:
            metrics["code"] = self.code.as_dict()
        self.write_metrics({**metrics, "epochs": rows})
        if rows:
            self.plot_curves(rows, title)

    def save_weights(self, model: nn.Module) -> None:
        """Write the model's ``state_dict`` to ``model.pt``."""
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        with self._writing():
            atomic_write_bytes(self.path / WEIGHTS, buffer.getvalue())

    def plot_curves(self, epochs: list[dict[str, Any]], title: str) -> None:
        """Train loss, train accuracy and test accuracy per epoch, like the book's figure."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        x = [row["epoch"] for row in epochs]
        figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
        axes.plot(x, [row["train_loss"] for row in epochs], "-", label="train loss")
        axes.plot(x, [row["train_acc"] for row in epochs], "m--", label="train acc")
        axes.plot(x, [row["test_acc"] for row in epochs], "g-.", label="test acc")
        axes.set_xlabel("epoch")
        axes.set_xlim(0.5, max(x) + 0.5)
        axes.grid(True, alpha=0.3)
        axes.legend()
        axes.set_title(title, fontsize=9)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        with self._writing():
            atomic_write_bytes(self.path / CURVES, buffer.getvalue())

    def record_failed_write(
        self, error: RunFilesError, epochs: Sequence[Any] = (), title: str = ""
    ) -> RunFilesError:
        """After ``error`` (a file of this run could not be written), record the run as
        ``failed`` if ``metrics.json`` can still be written; returns the error to raise: ``error``
        itself, or one that also names the file that could not be written then."""
        try:
            self.record("failed", list(epochs), str(error), title)
        except RunFilesError as second:
            return RunFilesError(f"{error}; then {second}", self.path)
        return error
