"""A run directory: the config, per-epoch metrics, final weights and the curves, written safely.

Every file is written to a temporary name in the same directory and then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so an interrupted or crashed run leaves
the previous complete version of each file, never a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG = "config.json"
METRICS = "metrics.json"
WEIGHTS = "model.pt"
CURVES = "curves.png"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


class RunDirectory:
    """The files of one run under ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, root: Path | str, label: str) -> RunDirectory:
        """A new directory ``root/<YYYYmmdd-HHMMSS>-<label>[-k]`` that did not exist before."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            path = root / (f"{stamp}-{safe}" + (f"-{attempt}" if attempt else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise FileExistsError(f"could not create a fresh run directory under {root}")

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / CONFIG, config)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.path / METRICS, metrics)

    def save_weights(self, model: nn.Module) -> None:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
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
        atomic_write_bytes(self.path / CURVES, buffer.getvalue())
