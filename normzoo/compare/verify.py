"""Reruns of stored results: does a stored run still come out of today's code, bit for bit?

A result is stored under a key that covers what the run computes and the norm's declared
version, not the code that computed it: a change that alters a norm's numbers without a version
bump keeps serving results that today's code no longer makes. ``normzoo compare PAGE --verify
K`` reruns K of the stored runs that the pages plan, chosen at random with a seed it prints
(``--verify-seed`` repeats a choice), and ``--verify-run KEY`` the runs named by key. Each
rerun gets its stored configuration, on its stored device, with the torch thread count its
result records; its result goes to a scratch folder that is removed afterwards, so nothing
stored is written or overwritten. A run is *exact* when every per-epoch number of
:data:`VERIFIED_NUMBERS` is bit-identical to the stored one, else *different*, with the first
number that differs.
"""

from __future__ import annotations

import math
import random
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from normzoo.compare import counted, planned_runs
from normzoo.compare.cache import OPTIONAL_EPOCH_NUMBERS, ResultStore, resolved_config
from normzoo.compare.execute import PendingRun, run_all
from normzoo.compare.page import find_pages, parse_page
from normzoo.errors import NormzooError
from normzoo.harness.interrupts import stops_interrupt

#: The numbers of each epoch a rerun must reproduce (and ``running_test_acc`` where the stored
#: epoch holds it); the timings (examples per second, seconds) are not results.
VERIFIED_NUMBERS = ("train_loss", "train_acc", "test_acc")


@dataclass(frozen=True)
class Verdict:
    """How the rerun of stored run ``key`` (variant ``label``, ``seed``) compares with it:
    ``difference`` is ``None`` when exact, else the first number that differs; ``elsewhere``
    says where the stored run was made when that is not where it was rerun; ``error`` says why
    a rerun failed."""

    key: str
    label: str
    seed: int
    difference: str | None = None
    elsewhere: str = ""
    error: str | None = None

    @property
    def exact(self) -> bool:
        return self.difference is None and self.error is None

    def line(self) -> str:
        name = f"{self.key}  {self.label} seed {self.seed}"
        if self.error is not None:
            return f"failed     {name}: {self.error}"
        if self.difference is not None:
            where = f" ({self.elsewhere})" if self.elsewhere else ""
            return f"different  {name}: {self.difference}{where}"
        return f"exact      {name}"


def _bits(value: Any) -> bytes:
    """The float64 bits of ``value``: 0.0 and -0.0 differ, NaN equals NaN."""
    return struct.pack("<d", float(value))


def first_difference(stored: dict[str, Any], rerun: dict[str, Any]) -> str | None:
    """The first per-epoch number of :data:`VERIFIED_NUMBERS` (epoch by epoch) in which
    ``rerun`` differs from ``stored``, both values given; else a differing status or epoch
    count; ``None`` when every number is bit-identical."""
    for old, new in zip(stored["epochs"], rerun["epochs"], strict=False):  # counts: below
        present = [field for field in OPTIONAL_EPOCH_NUMBERS if field in old]
        for field in (*VERIFIED_NUMBERS, *present):
            if _bits(old[field]) != _bits(new.get(field, math.nan)):
                return f"epoch {old['epoch']} {field}: stored {old[field]!r}, rerun {new[field]!r}"
    if stored["status"] != rerun["status"] or len(stored["epochs"]) != len(rerun["epochs"]):
        return (
            f"stored {stored['status']} after {counted(len(stored['epochs']), 'epoch')}, "
            f"rerun {rerun['status']} after {counted(len(rerun['epochs']), 'epoch')}"
        )
    return None


@dataclass(frozen=True)
class _Stored:
    """A stored run the pages plan: how to rerun it, and its result."""

    run: PendingRun
    seed: int
    result: dict[str, Any]


def _stored_runs(paths: Sequence[Path | str]) -> list[tuple[PendingRun, int]]:
    """Every stored run that the pages at ``paths`` plan, once each, in the pages' order
    (sorted by path, as ``normzoo compare`` runs them), with its seed."""
    pages = [parse_page(path) for path in sorted(find_pages(list(paths)))]
    if not pages:
        listed = ", ".join(map(str, paths))
        raise NormzooError(f"no page with a ```normzoo experiment block in {listed}")
    unique: dict[tuple[Path, str], tuple[PendingRun, int]] = {}
    for page in pages:
        for run in planned_runs(page):
            if ResultStore(run.results_dir).has(run.key):
                unique.setdefault((run.results_dir, run.key), (run, run.config.seed))
    return list(unique.values())


def choose(
    stored: list[tuple[PendingRun, int]], count: int, keys: Sequence[str], seed: int
) -> list[tuple[PendingRun, int]]:
    """The runs named by ``keys``, then ``count`` others drawn from ``stored`` with ``seed``
    (all of them when there are fewer). A key that no stored run of the pages has is a
    :class:`~normzoo.errors.NormzooError` naming it."""
    by_key = {run.key: (run, seed_of_run) for run, seed_of_run in stored}
    for key in keys:
        if key not in by_key:
            folders = ", ".join(sorted({str(run.results_dir) for run, _ in stored})) or "none"
            raise NormzooError(
                f"--verify-run {key}: no stored run of these pages has that key; a key is the "
                f"name of a result file (KEY.json) in the pages' results folders: {folders}"
            )
    named = [by_key[key] for key in dict.fromkeys(keys)]
    others = [entry for entry in stored if entry[0].key not in keys]
    drawn = random.Random(seed).sample(others, min(count, len(others)))
    return named + drawn


def verify(
    paths: Sequence[Path | str],
    count: int = 0,
    keys: Sequence[str] = (),
    seed: int | None = None,
    jobs: int = 1,
    say: Callable[[str], None] = print,
) -> list[Verdict]:
    """Rerun ``count`` stored runs of the pages at ``paths``, chosen at random with ``seed``
    (``None``: a fresh seed, printed), and the runs named by ``keys``; ``jobs`` at a time.

    Each verdict is said as its rerun ends, then a summary; returns the verdicts. Nothing
    stored is written. A stored result that is not its run's is a
    :class:`~normzoo.compare.cache.ResultFileError` before anything runs. Ctrl-C or SIGTERM
    raise :class:`KeyboardInterrupt` once the reruns are stopped and the scratch folder
    removed.
    """
    seed = random.SystemRandom().randrange(2**32) if seed is None else seed
    with stops_interrupt(), tempfile.TemporaryDirectory(prefix="normzoo-verify-") as scratch:
        stored = _stored_runs(paths)
        chosen = []
        for run, run_seed in choose(stored, count, keys, seed):
            result = ResultStore(run.results_dir).load(run.key, resolved_config(run.config))
            config = replace(run.config, device=result["device"])
            rerun = replace(run, config=config, results_dir=Path(scratch))
            chosen.append(_Stored(rerun, run_seed, result))
        drawn = f" (drawn with --verify-seed {seed})" if count else ""
        say(
            f"verifying {len(chosen)} of {counted(len(stored), 'stored run')}{drawn}: each "
            "rerun with its stored configuration and thread count; nothing is stored"
        )
        _warn_of_a_shared_process(chosen, jobs, say)
        by_key = {entry.run.key: entry for entry in chosen}
        verdicts: list[Verdict] = []

        def done(
            run: PendingRun, result: dict[str, Any] | None, error: BaseException | None
        ) -> None:
            entry = by_key[run.key]
            if result is None:
                verdict = Verdict(run.key, run.label, entry.seed, error=str(error))
            else:
                verdict = Verdict(
                    run.key, run.label, entry.seed, first_difference(entry.result, result),
                    _elsewhere(entry.result, result),
                )  # fmt: skip
            verdicts.append(verdict)
            say(verdict.line())

        for threads in sorted({entry.result["threads"] for entry in chosen}):
            group = [entry.run for entry in chosen if entry.result["threads"] == threads]
            run_all(group, jobs, threads, done)
    exact = sum(verdict.exact for verdict in verdicts)
    say(f"{counted(len(verdicts), 'run')}: {exact} exact, {len(verdicts) - exact} not")
    differing = [verdict for verdict in verdicts if verdict.difference is not None]
    if any(not verdict.elsewhere for verdict in differing):
        say(
            "a stored result that today's code does not reproduce on its own platform was made "
            "by other code: bump the norm's version in its NormInfo (its runs get new keys and "
            "are redone), or delete the result file and run normzoo compare on its page again"
        )
    if any(verdict.elsewhere for verdict in differing):
        say(
            "a stored result made with another torch or on another machine can differ in the "
            "last bits from the first step without any change to the code, and the difference "
            "grows: verify it where it was made to tell a change of the code"
        )
    return verdicts


def _elsewhere(stored: dict[str, Any], rerun: dict[str, Any]) -> str:
    """Where the stored run was made when that is not where it was rerun (another torch or
    machine can differ in the last bits without any change to normzoo); else ``""``."""
    made, now = (stored.get("torch"), stored["machine"]), (rerun["torch"], rerun["machine"])
    if made == now:
        return ""
    return f"stored with torch {made[0]} on {made[1]}, rerun with torch {now[0]} on {now[1]}"


def _warn_of_a_shared_process(chosen: list[_Stored], jobs: int, say: Callable[[str], None]) -> None:
    """With one job the reruns run in this process, whose thread count is set per run; a
    thread pool that a plugin sized when it loaded (pit's numba loops) keeps this process's
    count, and can change that plugin's numbers."""
    threads = torch.get_num_threads()
    recorded = sorted({entry.result["threads"] for entry in chosen} - {threads})
    if jobs == 1 and recorded:
        wanted = recorded[0]
        say(
            f"note: this process started with {counted(threads, 'torch thread')} and the "
            f"stored runs record {wanted}; a plugin that sized a thread pool when it loaded "
            f"(pit's numba loops) may compute differently: set OMP_NUM_THREADS={wanted}, or "
            "pass --jobs 2 (fresh processes)"
        )
