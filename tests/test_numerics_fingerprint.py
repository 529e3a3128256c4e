"""Each bundled norm's numbers, pinned: a change that alters them must bump the norm's version.

A comparison's cache key holds a norm's declared ``version``, not its code, so a change to a
norm's numbers without a version bump keeps serving results made by the old code (the README's
``pit`` seed-3 run was made before pit's fused loops and no longer reproduces). Here every
bundled norm trains the default LeNet a few steps on fixed data, float32 on one thread, and the
exact outcome (the losses' bits, hashes of the eval logits and of every parameter and buffer) is
compared with ``tests/numerics_fingerprints.json``, stored with the version it was made at.

The last bits depend on the platform as well as on the code: torch's version and the kernels it
and its libraries pick for the CPU (the README's results were made on an Intel Xeon, and reruns
of them on an AMD EPYC with the same torch differ from the first epoch). So each norm's numbers
are stored per platform (:func:`platform`), its version once: on a platform with numbers the
test compares them exactly; on one without, it is skipped with the command that adds them,
which is safe to run only while the norm's code is the one its version names.

Only the norms bundled with normzoo are pinned: a third party's norm (the example plugin's
``mean-only-bn``) is versioned in its own package, whose tests would pin it there.

The training loop is a plain one rather than the harness's, so that the fingerprint moves with
the norm and the workload's model, not with the harness (which :data:`HARNESS_VERSION
<normzoo.compare.cache.HARNESS_VERSION>` covers). The fingerprints are computed in a fresh
process started with one thread (``OMP_NUM_THREADS`` and ``NUMBA_NUM_THREADS`` 1): a thread pool
sized when a plugin loads (pit's numba loops) changes pit's numbers, whatever the thread count
set later, so the numbers must not depend on what this test process ran before.

After bumping a norm's version (or adding a norm, or on a new platform), store its numbers::

    python -m tests.test_numerics_fingerprint --update NORM [NORM ...]   # or: --update all
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform as python_platform
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import normzoo
from normzoo.interface import NormInfo
from normzoo.workloads.data import Split, load_workload_data
from normzoo.workloads.slots import EVERY_SLOT, ModelSettings, build_model

FINGERPRINTS = Path(__file__).with_name("numerics_fingerprints.json")
REPOSITORY = Path(__file__).resolve().parents[1]
UPDATE = "python -m tests.test_numerics_fingerprint --update"
WORKLOAD = "lenet"
SEED = 0
EXAMPLES = 32
STEPS = 3
LR = 0.1


def bundled_norms() -> dict[str, NormInfo]:
    """The norms registered by the plugins bundled with normzoo, by name."""
    bundled = {name for record in normzoo.plugins() if record.builtin for name in record.norms}
    return {info.name: info for info in normzoo.available() if info.name in bundled}


@cache
def fixed_examples() -> tuple[Split, Split]:
    """The first :data:`EXAMPLES` training and test examples of the workload's bundled data."""
    data = load_workload_data(WORKLOAD, None, False)
    return data.train.subset(EXAMPLES), data.test.subset(EXAMPLES)


def platform() -> str:
    """What besides the code decides the last bits: torch's version, the CPU capability its
    kernels are dispatched on, and the CPU model."""
    model = python_platform.processor() or python_platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {capability}, {model}"


def placement(info: NormInfo) -> str:
    """Every slot of the workload, or, for a norm that does not take all of their layouts
    (``instancenorm`` has no ``fc``), the slots of its first layout that the workload has."""
    layouts = normzoo.workload(WORKLOAD).layouts
    if set(layouts) <= set(info.layouts):
        return EVERY_SLOT
    return next(layout for layout in layouts if layout in info.layouts)


def _sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(norm: str) -> dict[str, Any]:
    """Norm ``norm`` in the workload's model with its default options: :data:`STEPS` SGD steps
    at :data:`LR` on the fixed training examples (one batch), then one eval forward on the
    fixed test examples; float32, one torch thread, seed :data:`SEED`."""
    info = normzoo.info(norm)
    train, test = fixed_examples()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        model = build_model(ModelSettings(workload=WORKLOAD, norm=norm, placement=placement(info)))
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        loss_fn = nn.CrossEntropyLoss()
        losses = []
        model.train()
        for _ in range(STEPS):
            loss = loss_fn(model(train.images), train.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()).hex())
        model.eval()
        with torch.no_grad():
            logits = model(test.images)
    finally:
        torch.set_num_threads(threads)
    return {
        "train_losses": losses,
        "eval_loss": float(loss_fn(logits, test.labels)).hex(),
        "eval_logits_sha256": _sha256({"logits": logits}),
        "state_sha256": _sha256(model.state_dict()),
    }


def fingerprints_in_a_fresh_process(norms: list[str]) -> dict[str, dict[str, Any]]:
    """:func:`fingerprint` of each of ``norms``, computed in a new process on one thread."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_numerics_fingerprint", "--print", *norms],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"computing the fingerprints failed:\n{done.stderr}")
    return json.loads(done.stdout)


def first_difference(stored: dict[str, Any], computed: dict[str, Any]) -> str | None:
    """The first number in which ``computed`` differs from ``stored``, both values named."""
    for field, value in computed.items():
        kept = stored.get(field)
        if not isinstance(value, list):
            if kept != value:
                return f"{field} is {value}, stored {kept}"
            continue
        kept = kept if isinstance(kept, list) else []
        for index, item in enumerate(value):
            have = kept[index] if index < len(kept) else None
            if have != item:
                return f"{field}[{index}] is {item}, stored {have}"
    return None


def problem(
    norm: str, version: str, entry: dict[str, Any] | None, computed: dict[str, Any]
) -> str | None:
    """What is wrong with norm ``norm`` at ``version`` whose numbers on this platform are
    ``computed``, against its stored ``entry`` (``None``: it has none); ``None`` when nothing,
    or when the entry has no numbers for this platform."""
    if entry is None:
        return (
            f"norm {norm} has no stored fingerprint: add it with `{UPDATE} {norm}` and commit "
            f"{FINGERPRINTS.name}"
        )
    if entry["version"] != version:
        return (
            f"norm {norm} is at version {version}, fingerprints at {entry['version']}: "
            f"regenerate with `{UPDATE} {norm}`"
        )
    stored = entry["platforms"].get(platform())
    difference = None if stored is None else first_difference(stored, computed)
    if difference is None:
        return None
    return (
        f"numbers of norm {norm} changed at version {version}: bump its version in NormInfo "
        f"and rerun its stored results (normzoo compare --verify); {difference}"
    )


def read_fingerprints() -> dict[str, Any]:
    return json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.is_file() else {"norms": {}}


def stored_entry(norm: str) -> dict[str, Any] | None:
    return read_fingerprints()["norms"].get(norm)


@pytest.fixture(scope="module")
def computed() -> dict[str, dict[str, Any]]:
    """The fingerprint of every bundled norm, computed once for the module."""
    return fingerprints_in_a_fresh_process(sorted(bundled_norms()))


@pytest.mark.parametrize("norm", sorted(bundled_norms()))
def test_a_norms_numbers_match_its_stored_fingerprint(norm, computed):
    entry = stored_entry(norm)
    found = problem(norm, normzoo.info(norm).version, entry, computed[norm])
    assert found is None, found
    if platform() not in entry["platforms"]:
        pytest.skip(
            f"norm {norm} has no fingerprint for this platform ({platform()}); on the code "
            f"its version names, add one with `{UPDATE} {norm}`"
        )


def test_every_stored_fingerprint_is_of_a_bundled_norm():
    stale = sorted(set(read_fingerprints()["norms"]) - set(bundled_norms()))
    assert not stale, (
        f"stored fingerprints of norms that are not bundled: {', '.join(stale)}; remove them "
        f"with `{UPDATE} {' '.join(stale)}`"
    )


def test_a_tiny_change_to_a_norms_forward_is_reported(monkeypatch):
    version = normzoo.info("batchnorm").version
    entry = {"version": version, "platforms": {platform(): fingerprint("batchnorm")}}
    assert problem("batchnorm", version, entry, fingerprint("batchnorm")) is None
    layer = type(normzoo.build("batchnorm", 6))
    forward = layer.forward
    monkeypatch.setattr(layer, "forward", lambda self, x: forward(self, x) + 1e-6)
    found = problem("batchnorm", version, entry, fingerprint("batchnorm"))
    assert found is not None
    assert found.startswith(
        f"numbers of norm batchnorm changed at version {version}: bump its version in NormInfo "
        "and rerun its stored results (normzoo compare --verify); "
    )
    assert ", stored 0x" in found  # the first differing number, both values


def test_a_new_version_or_a_missing_entry_says_how_to_regenerate():
    computed = {"train_losses": ["0x1.0p+0"]}
    found = problem("pit", "2", {"version": "1", "platforms": {platform(): computed}}, computed)
    assert found == (
        "norm pit is at version 2, fingerprints at 1: regenerate with "
        "`python -m tests.test_numerics_fingerprint --update pit`"
    )
    found = problem("newnorm", "1", None, computed)
    assert found is not None and f"`{UPDATE} newnorm`" in found


def update(names: list[str]) -> list[str]:
    """Store this platform's fingerprints of the norms ``names`` (``all``: every bundled norm,
    and no other) at their versions; a norm whose version changed loses every other platform's
    numbers, and a named norm that is not bundled loses its entry. Returns what was done, a
    line per norm."""
    bundled = bundled_norms()
    stored = read_fingerprints()["norms"]
    if names == ["all"]:
        names = sorted(bundled.keys() | stored.keys())
    unknown = [name for name in names if name not in bundled and name not in stored]
    if unknown:
        known = ", ".join(sorted(bundled))
        raise SystemExit(f"error: {unknown[0]!r} is not a bundled norm; choose from {known}")
    fresh = fingerprints_in_a_fresh_process([name for name in names if name in bundled])
    done = []
    here = platform()
    for name in names:
        if name in fresh:
            version = bundled[name].version
            if stored.get(name, {}).get("version") != version:
                stored[name] = {"version": version, "platforms": {}}
            stored[name]["platforms"][here] = fresh[name]
            done.append(f"{name}: stored at version {version} for {here}")
        else:
            del stored[name]
            done.append(f"{name}: not a bundled norm; its entry removed")
    document = {
        "about": "tests/test_numerics_fingerprint.py: the numbers of each bundled norm at its "
        f"version, per platform; store them with `{UPDATE} NORM` after bumping the norm's "
        "version, or on a platform without them",
        "norms": dict(sorted(stored.items())),
    }
    FINGERPRINTS.write_text(json.dumps(document, indent=2) + "\n")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.test_numerics_fingerprint",
        description="Regenerate the numerics fingerprints of bundled norms (run it after "
        "bumping a norm's version, then rerun that norm's stored results).",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--update", nargs="+", metavar="NORM",
        help="the norms whose fingerprints to store; 'all' for every bundled norm",
    )  # fmt: skip
    action.add_argument(
        "--print", nargs="+", metavar="NORM", dest="show",
        help="print the fingerprints of these norms as JSON, computed in this process",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.show:
        print(json.dumps({name: fingerprint(name) for name in args.show}))
        return 0
    for line in update(args.update):
        print(line)
    print(f"wrote {FINGERPRINTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
