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
import math
from pathlib import Path
from typing import Any

from normzoo import registry
from normzoo.errors import NormzooError
from normzoo.harness.config import COMPUTED_FIELDS, PRECISE_BATCHES, RunConfig
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
    _name_the_reestimation_as_stored(settings)
    settings["norm_options"] = config.resolved_norm_options()
    settings["norm_version"] = registry.info(config.norm).version
    settings["workload_version"] = registry.workload(config.workload).version
    settings["harness_version"] = HARNESS_VERSION
    return settings


def _name_the_reestimation_as_stored(settings: dict[str, Any]) -> None:
    """Name the re-estimation as the stored results do: in batches (``precise_stats``), its
    unit before it counted examples, when the count is a whole number of batches, so that a
    result computed the same way keeps its key; otherwise in examples (``precise_examples``).
    """
    examples = settings.pop("precise_examples")
    batches, rest = divmod(examples, settings["batch_size"])
    settings["precise_stats" if rest == 0 else "precise_examples"] = examples if rest else batches


def run_key(resolved: dict[str, Any]) -> str:
    """A stable 16-hex-digit name for a :func:`resolved_config`: a hash of what differs from
    the defaults (settings, norm options, the default workload's version) and of the norm's
    and harness's versions."""
    defaults = _stored_defaults()
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


def _stored_defaults() -> dict[str, Any]:
    """Each computed setting's default, as :func:`resolved_config` names it. A count of
    examples that is no whole number of batches has no default: it is always in the key, or
    a result of another batch size stored with the old default would answer for it."""
    settings = {name: getattr(RunConfig(), name) for name in COMPUTED_FIELDS}
    settings.pop("precise_examples")
    settings["precise_stats"] = PRECISE_BATCHES
    return settings


class ResultFileError(NormzooError):
    """A file in the results directory is not a stored result, or not the result of the run it
    is named after."""


#: The statuses a stored run can have: what :func:`~normzoo.harness.launch.launch` returns.
RESULT_STATUSES = ("finished", "diverged")
#: The numbers of each epoch that the table and the plots read.
EPOCH_NUMBERS = ("epoch", "train_loss", "train_acc", "test_acc", "examples_per_sec")
#: The numbers only some epochs hold: ``running_test_acc`` is recorded by runs that re-estimate
#: their statistics (:class:`~normzoo.harness.train.EpochMetrics`), and by no run made before it.
OPTIONAL_EPOCH_NUMBERS = ("running_test_acc",)
#: What each epoch number must be besides finite (a stored result holds no NaN or infinity:
#: a run whose loss stops being finite ends as ``diverged`` with the epochs before it, and the
#: result files are strict JSON), as a test and its name in a message.
EPOCH_RANGES = {
    "epoch": (lambda value: value >= 1 and value == int(value), "an epoch number >= 1"),
    "train_loss": (lambda value: value >= 0, "a loss >= 0"),
    "train_acc": (lambda value: 0 <= value <= 1, "an accuracy in [0, 1]"),
    "test_acc": (lambda value: 0 <= value <= 1, "an accuracy in [0, 1]"),
    "running_test_acc": (lambda value: 0 <= value <= 1, "an accuracy in [0, 1]"),
    "examples_per_sec": (lambda value: value > 0, "a speed > 0"),
}
#: What the result files written before workloads existed lack in their ``config``: the
#: workload they were all computed on, at its version then. Pinned rather than read from
#: :class:`RunConfig` and the registry, so that a new default workload or a bumped version
#: never passes an old file off as its result.
BEFORE_WORKLOADS = {"workload": "lenet", "workload_version": "1"}

_MISSING = object()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that is not NaN or infinite (an int of any size is finite)."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def _field_problem(
    container: dict[str, Any], field: str, kind: str, prefix: str = ""
) -> str | None:
    """What is wrong with ``container[field]`` for a value of ``kind``, the field named as
    ``prefix + field``; ``None`` when nothing."""
    name = prefix + field
    if field not in container:
        return f"no field {name}"
    value = container[field]
    checks = {
        "a number": _is_number(value),
        "a finite number": _is_finite(value),
        "a count >= 1": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        "a string": isinstance(value, str),
        "an object": isinstance(value, dict),
        "a list": isinstance(value, list),
    }
    return None if checks[kind] else f"{name} is {_short(value)}, not {kind}"


def shape_problem(result: Any) -> str | None:
    """What a loaded result file lacks of what the table and the plots read
    (:mod:`~normzoo.compare.summary`, :mod:`~normzoo.compare.render`), the first bad field
    named; ``None`` when it has it all. Each epoch's numbers must be finite and in their range
    (:data:`EPOCH_RANGES`): an accuracy of 7.5 would be averaged into the table unnoticed."""
    if not isinstance(result, dict):
        return f"a JSON {type(result).__name__}, not an object"
    for field, kind in (
        ("key", "a string"), ("config", "an object"), ("status", "a string"),
        ("epochs", "a list"), ("affine", "an object"), ("seconds", "a finite number"),
        ("machine", "a string"), ("device", "a string"), ("threads", "a count >= 1"),
    ):  # fmt: skip
        problem = _field_problem(result, field, kind)
        if problem:
            return problem
    problem = _field_problem(result["config"], "epochs", "a count >= 1", "config.")
    if problem:
        return problem
    if result["status"] not in RESULT_STATUSES:
        return f"status is {_short(result['status'])}, not one of {', '.join(RESULT_STATUSES)}"
    for index, epoch in enumerate(result["epochs"]):
        if not isinstance(epoch, dict):
            return f"epochs[{index}] is {_short(epoch)}, not an object"
        present = [field for field in OPTIONAL_EPOCH_NUMBERS if field in epoch]
        for field in (*EPOCH_NUMBERS, *present):
            problem = _field_problem(epoch, field, "a number", f"epochs[{index}].")
            if problem:
                return problem
            value, (fits, what) = epoch[field], EPOCH_RANGES[field]
            if not _is_finite(value):
                return f"epochs[{index}].{field} is {value!r}, not a finite number"
            if not fits(value):
                return f"epochs[{index}].{field} is {_short(value)}, not {what}"
    if result["status"] == "finished" and len(result["epochs"]) != result["config"]["epochs"]:
        return (
            f"status is finished but epochs holds {len(result['epochs'])} epochs, "
            f"config.epochs {result['config']['epochs']}"
        )
    for layer, entry in result["affine"].items():
        if not isinstance(entry, dict):
            return f"affine[{layer!r}] is {_short(entry)}, not an object"
        for parameter in ("weight", "bias"):
            names = (f"{parameter}_mean", f"{parameter}_std")
            if any(name in entry for name in names):
                for name in names:
                    problem = _field_problem(entry, name, "a finite number", f"affine[{layer!r}].")
                    if problem:
                        return problem
    return None


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from a result file (tuples as lists, and so on)."""
    return json.loads(json.dumps(value, default=str))


def _mismatch(
    stored: dict[str, Any], wanted: dict[str, Any], unstated: dict[str, Any], prefix: str = ""
) -> str | None:
    """The first setting in which ``stored`` is not ``wanted``; a setting ``stored`` lacks
    stands for its value in ``unstated``, what a run computed before the setting existed."""
    for name in [*wanted, *(name for name in stored if name not in wanted)]:
        have, want = stored.get(name, _MISSING), wanted.get(name, _MISSING)
        if want is _MISSING:
            return f"its config has {prefix}{name} = {_short(have)}, which this run has not"
        if have is _MISSING:
            if unstated.get(name, _MISSING) != want:
                return f"its config lacks {prefix}{name} (this run's is {_short(want)})"
        elif have != want:
            return f"its config has {prefix}{name} = {_short(have)}, this run {_short(want)}"
    return None


def identity_problem(
    result: dict[str, Any], key: str, expected: dict[str, Any] | None
) -> str | None:
    """How ``result`` (of the right shape) is not the result of run ``key``, whose
    :func:`resolved_config` is ``expected`` (``None``: only the key is checked); ``None`` when
    it is.

    The stored key must be ``key`` (the file's name), and every setting and norm option the
    file's configuration holds must equal the run's. A setting or option the file lacks was
    added after it was written, and is taken as what the run computed then: the default (the
    rule :func:`run_key` follows), and for the workload :data:`BEFORE_WORKLOADS`.
    """
    if result["key"] != key:
        return f"it holds the result of run {_short(result['key'])}"
    if expected is None:
        return None
    stored, wanted = result["config"], _jsonable(expected)
    unstated = _jsonable(_stored_defaults())
    unstated.update(BEFORE_WORKLOADS)
    options = stored.get("norm_options", {})
    problem = _mismatch(
        {k: v for k, v in stored.items() if k != "norm_options"},
        {k: v for k, v in wanted.items() if k != "norm_options"},
        unstated,
    )
    if problem or not isinstance(options, dict):
        return problem or f"its config has norm_options = {_short(options)}, not an object"
    norm_defaults = _jsonable(registry.info(expected["norm"]).resolve_options({}))
    return _mismatch(options, wanted["norm_options"], norm_defaults, "norm_options.")


class ResultStore:
    """The result files of one directory: ``<key>.json`` each, written atomically."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, expected: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The stored result of run ``key``, ``None`` when there is none.

        ``expected`` is the run's :func:`resolved_config`, which the file's must agree with
        (:func:`identity_problem`). :class:`ResultFileError` for a file that is not a result,
        lacks a field the table or the plots read (:func:`shape_problem`), or holds another
        run: one line naming the file (delete it, and the run is redone).
        """
        path = self.path(key)
        if not path.is_file():
            return None
        redo = "delete it and run normzoo compare again to redo that run"
        try:
            result = json.loads(path.read_text())
        except (ValueError, OSError) as error:
            raise ResultFileError(
                f"{path} is not a normzoo result ({type(error).__name__}: {error}); {redo}"
            ) from None
        problem = shape_problem(result)
        if problem:
            raise ResultFileError(f"{path} is not a normzoo result ({problem}); {redo}")
        problem = identity_problem(result, key, expected)
        if problem:
            raise ResultFileError(f"{path} is not the result of the run {key} ({problem}); {redo}")
        return result

    def save(self, key: str, result: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path(key), result)
