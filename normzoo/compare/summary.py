"""The statistics of a comparison: per variant over its seeds, and paired with the baseline.

Intervals are Student-t 95% intervals (``scipy.stats.t``): of the mean over seeds, and of the
mean paired difference to the baseline over the seeds both finished. Pairing removes what a
seed does to both arms alike (initial weights, batch order), which at lr 1.0 is most of the
run-to-run spread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its ``LEVEL`` interval (``low``/``high`` are NaN for fewer than 2 values)."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Interval:
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        mean = statistics.fmean(values)
        if n == 1:
            return cls(mean, math.nan, math.nan, math.nan, 1)
        from scipy import stats  # imported when needed: the CLI starts faster

        std = statistics.stdev(values)
        half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)
        return cls(mean, std, mean - half, mean + half, n)

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class VariantSummary:
    """What the table shows for one variant; ``runs`` maps seed to stored result."""

    label: str
    runs: dict[int, dict[str, Any]]
    final_test: Interval
    best_test: Interval
    final_train_loss: Interval
    examples_per_sec: Interval
    diverged: int
    versus_baseline: Interval | None


def final_test_acc(result: dict[str, Any]) -> float | None:
    """The last epoch's test accuracy of a finished run; ``None`` for a diverged one."""
    if result["status"] != "finished" or not result["epochs"]:
        return None
    return result["epochs"][-1]["test_acc"]


def summarize(
    label: str, runs: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]] | None
) -> VariantSummary:
    """Summarize one variant's runs; ``baseline`` is the baseline's runs (``None`` for the
    baseline itself), paired by seed."""
    finished = {s: r for s, r in runs.items() if final_test_acc(r) is not None}
    versus = None
    if baseline is not None:
        differences = []
        for seed, result in sorted(finished.items()):
            other = baseline.get(seed)
            if other is not None and final_test_acc(other) is not None:
                differences.append(final_test_acc(result) - final_test_acc(other))
        versus = Interval.of(differences)
    ordered = [finished[s] for s in sorted(finished)]
    return VariantSummary(
        label=label,
        runs=runs,
        final_test=Interval.of([final_test_acc(r) for r in ordered]),
        best_test=Interval.of([max(e["test_acc"] for e in r["epochs"]) for r in ordered]),
        final_train_loss=Interval.of([r["epochs"][-1]["train_loss"] for r in ordered]),
        examples_per_sec=Interval.of(
            [statistics.median(e["examples_per_sec"] for e in r["epochs"]) for r in ordered]
        ),
        diverged=len(runs) - len(finished),
        versus_baseline=versus,
    )
