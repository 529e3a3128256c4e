"""The run cache: one small JSON file per finished run, named by a hash of what it computed.

The key covers the full resolved configuration and the norm's declared ``version``, so a run
is redone exactly when something that changes its numbers changes: a bumped norm version
reruns that norm's runs only. Settings and norm options that equal their defaults are left out
of the key, so that a new option or harness setting whose default keeps the old behaviour does
not invalidate every stored result; the other side of that rule is that changing a default is
a change of the math, and bumps the norm's version (or :data:`HARNESS_VERSION`). Where and how
a run happened (device, thread count, machine) is recorded in the file but is not part of the
key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import normzoo
from normzoo.errors import NormzooError
from normzoo.harness.experiment import RunConfig
from normzoo.harness.model import frozen_affine_options
from normzoo.harness.runs import atomic_write_json

#: Bumped when the harness changes what a run computes (the model, the training loop, the data).
HARNESS_VERSION = "1"
_WHERE_NOT_WHAT = ("device", "data_dir", "download", "runs_dir", "nproc", "compile")


def resolved_config(config: RunConfig) -> dict[str, Any]:
    """What a run computes: every setting, the norm's options resolved, the versions.

    Raises the registry's one-line errors for an unknown norm or option.
    """
    info = normzoo.info(config.norm)
    options = dict(config.norm_options)
    if config.freeze_affine:
        options.update(frozen_affine_options(info, options))
    settings = {k: v for k, v in asdict(config).items() if k not in _WHERE_NOT_WHAT}
    settings["norm_options"] = info.resolve_options(options)
    settings["norm_version"] = info.version
    settings["harness_version"] = HARNESS_VERSION
    return settings


def run_key(resolved: dict[str, Any]) -> str:
    """A stable 16-hex-digit name for a :func:`resolved_config`: a hash of what differs from
    the defaults (harness settings and norm options) and of the versions."""
    defaults = {k: v for k, v in asdict(RunConfig()).items() if k not in _WHERE_NOT_WHAT}
    essential = {k: v for k, v in resolved.items() if k not in defaults or defaults[k] != v}
    norm_defaults = normzoo.info(resolved["norm"]).resolve_options({})
    essential["norm"] = resolved["norm"]
    essential["norm_options"] = {
        k: v for k, v in resolved["norm_options"].items() if norm_defaults.get(k, object()) != v
    }
    canonical = json.dumps(essential, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ResultFileError(NormzooError):
    """A file in the results directory is not a stored result."""


class ResultStore:
    """The result files of one directory: ``<key>.json`` each, written atomically."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored result, ``None`` when there is none; :class:`ResultFileError` for a file
        that is not a result (it names the file: delete it, and the run is redone)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text())
            if not isinstance(result, dict) or not isinstance(result["epochs"], list):
                raise ValueError("no list of epochs")
            result["status"]
        except (ValueError, KeyError, TypeError) as error:
            raise ResultFileError(
                f"{path} is not a normzoo result ({type(error).__name__}: {error}); delete it "
                "and run normzoo compare again to redo that run"
            ) from None
        return result

    def save(self, key: str, result: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path(key), result)
