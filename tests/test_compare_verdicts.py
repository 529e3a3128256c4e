"""The verdicts of a comparison page: paired p-values, Holm's adjustment over the page's
comparisons, the word each paired row gets, and the last-3 metric that replaced the
test-selected best epoch.

The p-values are checked against ``scipy.stats.ttest_rel`` and Holm against the textbook
definition written out here, so that neither check reuses the code it checks.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import pytest
from scipy import stats

from normzoo.compare import check, compare
from normzoo.compare.page import BEGIN, END, parse_page
from normzoo.compare.render import render_section
from normzoo.compare.summary import (
    FAMILY_ERROR,
    Interval,
    adjust_for_multiplicity,
    holm,
    last_epochs_test_acc,
    summarize,
)

from .pages import QUIET, TINY, write_page

BASELINE_ACCURACY = 0.8


def result(test_accuracies: list[float]) -> dict[str, Any]:
    """A finished run with these test accuracies, one per epoch, and what the footer reads."""
    epochs = [
        {"epoch": i + 1, "test_acc": acc, "train_acc": acc, "train_loss": 1 - acc,
         "examples_per_sec": 1000.0}
        for i, acc in enumerate(test_accuracies)
    ]  # fmt: skip
    return {
        "status": "finished", "epochs": epochs, "config": {"epochs": len(epochs)},
        "machine": "a test", "device": "cpu", "threads": 1, "seconds": 1.0, "affine": {},
    }  # fmt: skip


def runs(finals: list[float]) -> dict[int, dict[str, Any]]:
    """One single-epoch run per seed 0, 1, ... with these final test accuracies."""
    return {seed: result([acc]) for seed, acc in enumerate(finals)}


def textbook_holm(p_values: list[float]) -> list[float]:
    """Holm as the textbooks define it: sort ascending; the i-th smallest (1-based) becomes
    max over j <= i of min(1, (m - j + 1) p_(j)); put back in the original order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda index: p_values[index])
    adjusted = [0.0] * m
    for i in range(1, m + 1):
        adjusted[order[i - 1]] = max(
            min(1.0, (m - j + 1) * p_values[order[j - 1]]) for j in range(1, i + 1)
        )
    return adjusted


def test_the_paired_p_value_is_scipy_paired_t_test():
    generator = random.Random(19)
    for n in (2, 3, 5, 8):
        for _ in range(5):
            baseline = [generator.uniform(0.8, 0.9) for _ in range(n)]
            variant = [b + generator.gauss(0.01, 0.02) for b in baseline]
            summary = summarize("variant", runs(variant), runs(baseline))
            expected = stats.ttest_rel(variant, baseline).pvalue
            assert math.isclose(summary.versus_baseline.p_value, expected, rel_tol=1e-9)


def test_a_p_value_without_spread_or_pairs_is_what_the_differences_say():
    assert Interval.of([0.01, 0.01, 0.01]).p_value == 0.0  # a difference, every time
    assert Interval.of([0.0, 0.0, 0.0]).p_value == 1.0  # no difference at all
    assert math.isnan(Interval.of([0.01]).p_value) and math.isnan(Interval.of([]).p_value)


def test_holm_is_the_textbook_step_down():
    generator = random.Random(7)
    for m in (1, 2, 3, 7, 20):
        for _ in range(20):
            p_values = [generator.choice([generator.random(), generator.random() / 50])
                        for _ in range(m)]  # fmt: skip
            p_values[0] = p_values[-1]  # a tie
            assert holm(p_values) == pytest.approx(textbook_holm(p_values), abs=1e-15)


def test_holm_on_a_hand_worked_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to
    # 0.06 so that a larger p never has a smaller adjusted one
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_verdicts_come_from_the_holm_adjusted_p():
    baseline = runs([BASELINE_ACCURACY] * 5)

    def paired(differences: list[float]) -> dict[int, dict[str, Any]]:
        return runs([BASELINE_ACCURACY + d for d in differences])

    summaries = adjust_for_multiplicity([
        summarize("baseline", baseline, None),
        summarize("better", paired([0.050, 0.052, 0.049, 0.051, 0.048]), baseline),
        summarize("worse", paired([-0.030, -0.031, -0.029, -0.032, -0.030]), baseline),
        summarize("borderline", paired([0.010, 0.020, -0.002, 0.015, 0.012]), baseline),
        summarize("nothing", paired([0.010, -0.012, 0.004, -0.006, 0.002]), baseline),
        summarize("one pair", {0: result([0.9])}, baseline),
    ])  # fmt: skip
    by_label = {summary.label: summary for summary in summaries}
    borderline = by_label["borderline"]
    assert borderline.versus_baseline.p_value < FAMILY_ERROR  # measurable on its own...
    assert borderline.adjusted_p >= FAMILY_ERROR  # ...but not among the page's four
    assert {label: summary.verdict for label, summary in by_label.items()} == {
        "baseline": None,
        "better": "better",
        "worse": "worse",
        "borderline": "no measurable difference",
        "nothing": "no measurable difference",
        "one pair": "n/a",
    }
    assert by_label["one pair"].adjusted_p is None and by_label["baseline"].adjusted_p is None
    tested = [by_label[label] for label in ("better", "worse", "borderline", "nothing")]
    expected = textbook_holm([summary.versus_baseline.p_value for summary in tested])
    assert [summary.adjusted_p for summary in tested] == pytest.approx(expected, abs=1e-15)


def test_rows_paired_with_their_own_baseline_are_in_the_same_family():
    baseline = runs([BASELINE_ACCURACY] * 3)
    other = runs([0.7, 0.71, 0.69])
    page_row = summarize("a", runs([0.81, 0.83, 0.80]), baseline)
    own_row = summarize("b", runs([0.72, 0.72, 0.70]), other)
    adjusted = adjust_for_multiplicity([summarize("baseline", baseline, None), page_row, own_row])
    p_values = [page_row.versus_baseline.p_value, own_row.versus_baseline.p_value]
    assert [summary.adjusted_p for summary in adjusted[1:]] == pytest.approx(holm(p_values))
    assert own_row.versus_baseline.p_value < page_row.versus_baseline.p_value
    assert adjusted[2].adjusted_p == pytest.approx(2 * own_row.versus_baseline.p_value)  # of two


@pytest.mark.parametrize("epochs", [2, 10])
def test_last_3_is_the_mean_of_the_last_3_epochs_or_of_all_in_a_shorter_run(epochs):
    accuracies = [0.5 + 0.03 * epoch for epoch in range(epochs)]
    expected = sum(accuracies[-3:]) / len(accuracies[-3:])
    assert last_epochs_test_acc(result(accuracies)) == pytest.approx(expected)
    seeds = {0: result(accuracies), 1: result([acc + 0.01 for acc in accuracies])}
    summary = summarize("v", seeds, None)
    assert summary.last_epochs_test.mean == pytest.approx(expected + 0.005)
    assert summary.last_epochs_test.n == 2


PAGE = """\
seeds = 5
baseline = "baseline"

[[variant]]
label = "baseline"

[[variant]]
label = "better"
lr = 0.5

[[variant]]
label = "nothing"
lr = 0.3
"""


def test_the_table_shows_last_3_holm_p_and_verdict_and_no_best_epoch(tmp_path):
    page = parse_page(write_page(tmp_path, PAGE))
    baseline = runs([BASELINE_ACCURACY] * 5)
    first, better, nothing = adjust_for_multiplicity([
        summarize("baseline", baseline, None),
        summarize("better", runs([0.85, 0.86, 0.84, 0.85, 0.86]), baseline),
        summarize("nothing", runs([0.81, 0.79, 0.8, 0.8, 0.8]), baseline),
    ])  # fmt: skip
    just_below_the_level = replace(better, adjusted_p=0.04996)
    section = render_section(page, [first, just_below_the_level, nothing])
    assert "best-epoch" not in section
    header, _, *rows = [line for line in section.splitlines() if line.startswith("| ")]
    cells = [cell.strip() for cell in header.split("|")[1:-1]]
    assert cells[4] == "last-3 test acc" and cells[-2:] == ["Holm p", "verdict"]
    assert all(len(row.split("|")) == len(header.split("|")) for row in rows)
    assert rows[0].endswith("| baseline | — | — |")
    assert rows[1].endswith("| 0.049 | better |")  # cut, not rounded up to 0.050
    assert rows[2].endswith("| 1.000 | no measurable difference |")
    assert "the page makes 2 paired comparisons, one family" in section
    assert "Holm-adjusted over the family at a family-wise error rate of 0.05" in section
    assert "the verdict comes from the adjusted p" in section


def test_a_p_below_a_thousandth_reads_as_such(tmp_path):
    page = parse_page(write_page(tmp_path, PAGE))
    baseline = runs([BASELINE_ACCURACY] * 5)
    summaries = adjust_for_multiplicity([
        summarize("baseline", baseline, None),
        summarize("better", runs([0.900, 0.901, 0.899, 0.900, 0.902]), baseline),
        summarize("nothing", runs([0.700, 0.701, 0.699, 0.700, 0.702]), baseline),
    ])  # fmt: skip
    rows = [line for line in render_section(page, summaries).splitlines() if line.startswith("| ")]
    assert rows[3].endswith("| <0.001 | better |")
    assert rows[4].endswith("| <0.001 | worse |")


# tested with the running averages only, so the page has one table and a family of 2 (a page
# whose runs also re-estimate shows both: tests/test_both_protocols.py)
E2E_PAGE = f"""\
seeds = 2
baseline = "batch norm"

[base]
{TINY.replace("precise_stats = 2", "precise_stats = 0")}
[[variant]]
label = "batch norm"

[[variant]]
label = "lr 0.3"
lr = 0.3

[[variant]]
label = "no norm"
norm = "none"
"""


def test_a_compared_page_shows_the_verdicts_from_its_stored_results(tmp_path):
    path = write_page(tmp_path, E2E_PAGE)
    assert compare([path], QUIET) == 0
    text = path.read_text()
    section = text.split(BEGIN)[1].split(END)[0]
    assert "best-epoch" not in section
    assert "| last-3 test acc |" in section and "| Holm p | verdict |" in section
    assert "the page makes 2 paired comparisons" in section

    finals: dict[str, dict[int, float]] = {}
    for stored in (tmp_path / "results").glob("*.json"):
        run = json.loads(stored.read_text())
        finals.setdefault(run["label"], {})[run["config"]["seed"]] = run["epochs"][-1]["test_acc"]
    labels = ["lr 0.3", "no norm"]
    p_values = [
        stats.ttest_rel([finals[label][s] for s in (0, 1)],
                        [finals["batch norm"][s] for s in (0, 1)]).pvalue
        for label in labels
    ]  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in section.splitlines()
            if line.startswith("| ")}  # fmt: skip
    for label, adjusted in zip(labels, textbook_holm(p_values), strict=True):
        cells = [cell.strip() for cell in rows[label].split("|")[1:-1]]
        shown = "<0.001" if adjusted < 0.001 else f"{math.floor(adjusted * 1000) / 1000:.3f}"
        difference = sum(finals[label][s] - finals["batch norm"][s] for s in (0, 1))
        verdict = "better" if difference > 0 else "worse"
        assert cells[-2:] == [shown, verdict if adjusted < 0.05 else "no measurable difference"]
        assert cells[4] == cells[2]  # the last 3 epochs of a 1-epoch run: its final epoch
    assert check([path]) == []
