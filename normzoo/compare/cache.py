"""The run cache: one small JSON file per finished run, named by a hash of what it computed.

The key covers the full resolved configuration and the norm's declared ``version``, so a run
is redone exactly when something that changes its numbers changes: a bumped norm version
reruns that norm's runs only. Settings and norm options that equal their defaults are left out
of the key, so that a new option or harness setting whose default keeps the old behaviour does
not invalidate every stored result; the other side of that rule is that changing a default is
a change of the math, and bumps the norm's version (or the workload's, or
:data:`HARNESS_VERSION`). Where and how a run happened (the
:class:`~normzoo.harness.config.Resources`, the thread count, the machine) is recorded in the
file but is not part of the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from normzoo import registry
from normzoo.errors import NormzooError
from normzoo.harness.config import COMPUTED_FIELDS, RunConfig
from normzoo.harness.runs import atomic_write_json
from normzoo.interface import WorkloadInfo

#: Bumped when the harness changes what a run computes (the training loop, the protocol).
HARNESS_VERSION = "1"


def resolved_config(config: RunConfig) -> dict[str, Any]:
    """What a run computes: every computed setting, the norm's options resolved, the norm's and
    the workload's versions.

    Raises the registry's one-line errors for an unknown workload, norm or option.
    """
    settings = {name: getattr(config, name) for name in COMPUTED_FIELDS}
    settings["norm_options"] = config.resolved_norm_options()
    settings["norm_version"] = registry.info(config.norm).version
    settings["workload_version"] = registry.workload(config.workload).version
    settings["harness_version"] = HARNESS_VERSION
    return settings


def run_key(resolved: dict[str, Any]) -> str:
    """A stable 16-hex-digit name for a :func:`resolved_config`: a hash of what differs from
    the defaults (settings, norm options, the default workload's version) and of the norm's
    and harness's versions."""
    default = RunConfig()
    defaults: dict[str, Any] = {name: getattr(default, name) for name in COMPUTED_FIELDS}
    # a workload's first version, the one every result stored before workloads existed was
    # computed with: a version bump changes the key, another workload's first does not
    defaults["workload_version"] = WorkloadInfo.version
    essential = {k: v for k, v in resolved.items() if k not in defaults or defaults[k] != v}
    norm_defaults = registry.info(resolved["norm"]).resolve_options({})
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
