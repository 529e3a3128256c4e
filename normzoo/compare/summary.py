"""The statistics of a comparison: per variant over its seeds, and paired with the baseline.

Intervals are Student-t 95% intervals (``scipy.stats.t``): of the mean over seeds, and of the
mean paired difference to the baseline over the seeds both finished. Pairing removes what a
seed does to both arms alike (initial weights, batch order), which at lr 1.0 is most of the
run-to-run spread.

A page makes one paired comparison per row, often ten or more; at 95% each, one of twenty
differences with no effect behind it reads as measurable. So each paired row's p-value (the
two-sided paired t-test) is Holm-adjusted over all the page's comparisons (:func:`holm`,
:func:`adjust_for_multiplicity`), which holds the chance of any false "better" or "worse" on
the page at :data:`FAMILY_ERROR`, and the row's verdict is read from the adjusted p.

Runs that re-estimate their statistics before testing also record the accuracy of the same
weights tested with the running averages of training (the chapter's protocol); a page whose
runs all record it gets a second set of rows from it (:data:`RUNNING_AVERAGES`), in the same
family.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any

LEVEL = 0.95
#: The family-wise error rate that the verdicts hold over a page's comparisons: the intervals'
#: level seen from the other side (rounded, so that it is 0.05 and not 0.050000000000000044).
FAMILY_ERROR = round(1 - LEVEL, 6)
#: The test accuracy of a run's last this many epochs is averaged: at lr 1.0 the last epoch
#: alone swings from epoch to epoch.
LAST_EPOCHS = 3
#: The headline accuracy of a run: tested as the run's protocol says.
TESTED = "test_acc"
#: The epochs' accuracy with the running averages kept during training, recorded by the runs
#: that re-estimate their statistics before testing.
RUNNING_AVERAGES = "running_test_acc"


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

    @property
    def p_value(self) -> float:
        """The two-sided p of the one-sample t-test that the values' mean is 0: for paired
        differences, the paired t-test. NaN for fewer than 2 values; for values all alike
        (no spread, where t is undefined) 1 when they are all 0 and 0 otherwise."""
        if self.n < 2:
            return math.nan
        if self.std == 0:
            return 1.0 if self.mean == 0 else 0.0
        from scipy import stats

        t = self.mean / (self.std / math.sqrt(self.n))
        return float(2 * stats.t.sf(abs(t), self.n - 1))


@dataclass(frozen=True)
class VariantSummary:
    """What the table shows for one variant; ``runs`` maps seed to stored result."""

    label: str
    runs: dict[int, dict[str, Any]]
    final_test: Interval
    #: Per seed, the mean test accuracy of the last :data:`LAST_EPOCHS` epochs.
    last_epochs_test: Interval
    final_train_loss: Interval
    examples_per_sec: Interval
    diverged: int
    versus_baseline: Interval | None
    #: ``versus_baseline``'s p-value Holm-adjusted over the page's comparisons
    #: (:func:`adjust_for_multiplicity`); ``None`` until adjusted, for the baseline, and for a
    #: row with fewer than 2 pairs.
    adjusted_p: float | None = None
    #: The same runs summarized by their :data:`RUNNING_AVERAGES` accuracy, when every run of
    #: the page records it; else ``None``.
    running: VariantSummary | None = None

    @property
    def verdict(self) -> str | None:
        """``better``, ``worse`` or ``no measurable difference`` from the adjusted p and the
        sign of the mean paired difference; ``n/a`` for a row that cannot be tested (fewer
        than 2 pairs); ``None`` for the baseline."""
        if self.versus_baseline is None:
            return None
        if self.adjusted_p is None:
            return "n/a"
        if self.adjusted_p < FAMILY_ERROR and self.versus_baseline.mean > 0:
            return "better"
        if self.adjusted_p < FAMILY_ERROR and self.versus_baseline.mean < 0:
            return "worse"
        return "no measurable difference"


def final_test_acc(result: dict[str, Any], metric: str = TESTED) -> float | None:
    """The last epoch's test accuracy of a finished run; ``None`` for a diverged one."""
    if result["status"] != "finished" or not result["epochs"]:
        return None
    return result["epochs"][-1][metric]


def last_epochs_test_acc(result: dict[str, Any], metric: str = TESTED) -> float:
    """The mean test accuracy of a finished run's last :data:`LAST_EPOCHS` epochs (all of
    them, for a shorter run)."""
    return statistics.fmean(e[metric] for e in result["epochs"][-LAST_EPOCHS:])


def record_running_averages(results: list[dict[str, Any]]) -> bool:
    """Whether every epoch of every one of ``results`` (at least one) holds its accuracy with
    the running averages."""
    epochs = [epoch for result in results for epoch in result["epochs"]]
    return bool(epochs) and all(RUNNING_AVERAGES in epoch for epoch in epochs)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values``, in their order: the smallest p times m,
    the next times m - 1, ..., each at least the one before it (so that the order of the
    p-values is kept) and at most 1. Rejecting where an adjusted p is below a level holds the
    chance of any false rejection among the m at that level, whatever their dependence."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=p_values.__getitem__)):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _rows(summaries: list[VariantSummary]) -> list[VariantSummary]:
    """The page's rows: each variant's, then those of its running averages, where shown."""
    return [*summaries, *(s.running for s in summaries if s.running is not None)]


def adjust_for_multiplicity(summaries: list[VariantSummary]) -> list[VariantSummary]:
    """``summaries`` with ``adjusted_p`` set: the paired p-values of every row that can be
    tested (2 pairs or more; rows paired with their own baseline too, and the rows of the
    running averages), Holm-adjusted together, the page's comparisons being one family."""
    rows = _rows(summaries)
    tested = {
        index: row.versus_baseline.p_value
        for index, row in enumerate(rows)
        if row.versus_baseline is not None and row.versus_baseline.n >= 2
    }
    adjusted = dict(zip(tested, holm(list(tested.values())), strict=True))
    rows = [
        replace(row, adjusted_p=adjusted[index]) if index in adjusted else row
        for index, row in enumerate(rows)
    ]
    running = iter(rows[len(summaries) :])
    return [
        row if row.running is None else replace(row, running=next(running))
        for row in rows[: len(summaries)]
    ]


def comparisons(summaries: list[VariantSummary]) -> tuple[int, int]:
    """How many paired rows of ``summaries`` (with their running-average rows) were tested,
    and how many could not be (fewer than 2 pairs)."""
    rows = _rows(summaries)
    tested = sum(row.adjusted_p is not None for row in rows)
    untested = sum(row.versus_baseline is not None and row.adjusted_p is None for row in rows)
    return tested, untested


def summarize(
    label: str,
    runs: dict[int, dict[str, Any]],
    baseline: dict[int, dict[str, Any]] | None,
    metric: str = TESTED,
) -> VariantSummary:
    """Summarize one variant's runs by their ``metric`` accuracy; ``baseline`` is the
    baseline's runs (``None`` for the baseline itself), paired by seed."""
    finished = {s: r for s, r in runs.items() if final_test_acc(r) is not None}
    versus = None
    if baseline is not None:
        differences = []
        for seed, result in sorted(finished.items()):
            other = baseline.get(seed)
            if other is not None and final_test_acc(other) is not None:
                differences.append(final_test_acc(result, metric) - final_test_acc(other, metric))
        versus = Interval.of(differences)
    ordered = [finished[s] for s in sorted(finished)]
    return VariantSummary(
        label=label,
        runs=runs,
        final_test=Interval.of([final_test_acc(r, metric) for r in ordered]),
        last_epochs_test=Interval.of([last_epochs_test_acc(r, metric) for r in ordered]),
        final_train_loss=Interval.of([r["epochs"][-1]["train_loss"] for r in ordered]),
        examples_per_sec=Interval.of(
            [statistics.median(e["examples_per_sec"] for e in r["epochs"]) for r in ordered]
        ),
        diverged=len(runs) - len(finished),
        versus_baseline=versus,
    )
