"""Tuning with an equal budget: each variant's trials, its choice, and their report.

A page's ``[tune]`` table (:class:`~normzoo.compare.page.Tune`) gives every variant the same
trials: each combination of the searched values, once per tuning seed, trained on the training
set less the validation split and evaluated on that split (``val_split``; the test set is not
read). A trial's score is its validation accuracy averaged over its last
:data:`SCORE_EPOCHS` epochs, less noisy at lr 1.0 than the last epoch alone; a variant's score
for a combination is the mean over the tuning seeds, and a diverged trial scores 0. Each
variant takes the combination with the highest score; a tie goes to the smaller value (for
several settings, compared in the table's order), the cautious side for a learning rate. The
page's reported runs then use each variant's choice, on the whole training set, tested on the
test set, with the page's seeds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any

from normzoo.compare.page import Page, Tune, Variant

#: A trial's score averages its validation accuracy over this many last epochs.
SCORE_EPOCHS = 3


@dataclass(frozen=True)
class Trial:
    """One run of a variant's tuning: the searched values it tries, on one tuning seed."""

    variant: Variant
    values: dict[str, Any]
    seed: int

    @property
    def label(self) -> str:
        return f"{self.variant.label} [{describe(self.values)}]"


@dataclass(frozen=True)
class Tuning:
    """A variant's tuning: each combination's scores (one per tuning seed, in their order;
    ``None`` for a diverged trial) and the combination chosen."""

    label: str
    scores: list[tuple[dict[str, Any], list[float | None]]]
    chosen: dict[str, Any]

    def mean_score(self, values: dict[str, Any]) -> float:
        return next(mean_score(s) for v, s in self.scores if v == values)


def describe(values: dict[str, Any]) -> str:
    """``lr=0.3, batch_size=64``: a combination as the tables write it."""
    return ", ".join(f"{key}={value}" for key, value in values.items())


def trial_variant(variant: Variant, values: dict[str, Any], tune: Tune) -> Variant:
    """The variant as a trial runs it: the tried values, on the validation split."""
    settings = {**variant.settings, **values, "val_split": tune.val_split}
    return replace(variant, settings=settings, seeds=None, baseline=None)


def trials(page: Page) -> list[Trial]:
    """Every trial of a tuned page: each variant, combination and tuning seed."""
    assert page.tune is not None
    return [
        Trial(variant, values, seed)
        for variant in page.variants
        for values in page.tune.trials()
        for seed in page.tune.seeds
    ]


def score(result: dict[str, Any]) -> float | None:
    """A trial's score: its validation accuracy averaged over its last :data:`SCORE_EPOCHS`
    epochs; ``None`` for a run that did not finish (diverged)."""
    if result["status"] != "finished" or not result["epochs"]:
        return None
    return statistics.fmean(e["test_acc"] for e in result["epochs"][-SCORE_EPOCHS:])


def mean_score(scores: list[float | None]) -> float:
    """A combination's score over the tuning seeds; a diverged trial counts as 0."""
    return statistics.fmean(0.0 if s is None else s for s in scores)


def _order(values: dict[str, Any], space: dict[str, list[Any]]) -> tuple:
    """Sorts combinations smaller first: numbers by value, anything else by its place in the
    ``[tune]`` list."""
    return tuple(
        (0, value, 0) if isinstance(value, Real) and not isinstance(value, bool)
        else (1, 0, space[key].index(value))
        for key, value in values.items()
    )  # fmt: skip


def choose(tune: Tune, scores: list[tuple[dict[str, Any], list[float | None]]]) -> dict[str, Any]:
    """The combination with the highest mean score; among equal scores, the smallest."""
    best = max(mean_score(s) for _, s in scores)
    tied = [values for values, s in scores if mean_score(s) == best]
    return min(tied, key=lambda values: _order(values, tune.space))


def tuning(page: Page, results: dict[tuple[str, str, int], dict[str, Any]]) -> list[Tuning]:
    """Each variant's :class:`Tuning` from its trials' results, keyed by (variant label,
    :func:`describe` of the values, seed)."""
    assert page.tune is not None
    summaries = []
    for variant in page.variants:
        scores = [
            (
                values,
                [score(results[variant.label, describe(values), seed]) for seed in page.tune.seeds],
            )  # fmt: skip
            for values in page.tune.trials()
        ]
        summaries.append(Tuning(variant.label, scores, choose(page.tune, scores)))
    return summaries


def tuned_variants(page: Page, tunings: list[Tuning]) -> list[Variant]:
    """The page's variants with their chosen values: what the reported runs run."""
    chosen = {t.label: t.chosen for t in tunings}
    return [replace(v, settings={**v.settings, **chosen[v.label]}) for v in page.variants]


def render_tuning(page: Page, tunings: list[Tuning]) -> str:
    """The tuning table (each variant's score per combination, its choice) and what it did."""
    tune = page.tune
    assert tune is not None
    combinations = tune.trials()
    lines = [
        "",
        "| variant | " + " | ".join(describe(v) for v in combinations) + " | chosen |",
        "| --- | " + " | ".join("---:" for _ in combinations) + " | --- |",
    ]
    for t in tunings:
        cells = []
        for values, scores in t.scores:
            cell = f"{mean_score(scores):.4f}"
            diverged = sum(s is None for s in scores)
            cell += f" ({diverged} diverged)" if diverged else ""
            cells.append(f"**{cell}**" if values == t.chosen else cell)
        lines.append(f"| {t.label} | " + " | ".join(cells) + f" | {describe(t.chosen)} |")
    seeds = ", ".join(map(str, tune.seeds))
    count = len(combinations) * len(tune.seeds)
    searched = "; ".join(f"{key} in {', '.join(map(str, values))}"
                         for key, values in tune.space.items())  # fmt: skip
    lines += [
        "",
        f"Tuning, the same for every variant: {searched}; {count} trial"
        f"{'s' if count != 1 else ''} per variant ({len(combinations)} "
        f"combination{'s' if len(combinations) != 1 else ''} x tuning seed"
        f"{'s' if len(tune.seeds) != 1 else ''} {seeds}), each evaluated on {tune.val_split:,} "
        "examples held out of the training set (stratified by class, the same for every "
        "trial) and trained on the rest; the test set is not read. Score: "
        f"validation accuracy, mean of the last {SCORE_EPOCHS} epochs and of the tuning seeds "
        "(a diverged trial scores 0); each variant takes its highest score (bold), a tie going "
        "to the smaller value. The table below reports each variant with its choice, trained "
        "on the whole training set and tested on the test set, over the page's seeds.",
        "",
    ]
    edges = [f"{t.label} ({describe(t.chosen)})" for t in tunings if at_edge(tune, t.chosen)]
    if edges:
        lines += [
            f"At the edge of the range searched: {'; '.join(edges)}. Their best setting may lie "
            "beyond it: widen the search before reading their rows as their best.",
            "",
        ]
    return "\n".join(lines)


def at_edge(tune: Tune, chosen: dict[str, Any]) -> bool:
    """Whether a chosen combination takes the smallest or the largest value tried of a numeric
    setting searched over three values or more (with two, every choice is an edge)."""
    for key, values in tune.space.items():
        numbers = [v for v in values if isinstance(v, Real) and not isinstance(v, bool)]
        if len(numbers) == len(values) >= 3 and chosen[key] in (min(numbers), max(numbers)):
            return True
    return False
