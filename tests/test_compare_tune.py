"""Tuning with an equal budget: a page's ``[tune]`` table gives every variant the same trials
on a validation split, each variant's choice follows a stated rule, the reported runs use the
choice on the whole training set, and the test set is never read while tuning."""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path

import pytest

import normzoo.harness.experiment as experiment
from normzoo.compare import CompareConfig, check, compare
from normzoo.compare.page import BEGIN, END, MAX_TRIALS, PageError, Tune, parse_page
from normzoo.compare.render import plot_problem
from normzoo.compare.tune import SCORE_EPOCHS, at_edge, choose, mean_score, score
from normzoo.workloads.data import Dataset, Split

from .pages import QUIET

TINY = "epochs = 2\ntrain_subset = 256\ntest_subset = 128\nprecise_stats = 2\n"
TUNE = "[tune]\nlr = [0.3, 1.0]\nseeds = [7]\nval_split = 200\n"
TUNED = f"""\
seeds = 2
baseline = "batchnorm"

[base]
{TINY}
{TUNE}
[[variant]]
norm = "batchnorm"

[[variant]]
norm = "layernorm"
"""


def write_page(directory: Path, block: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    page = directory / "page.md"
    page.write_text(f"# A page\n\n```normzoo\n{textwrap.dedent(block)}```\n\n{BEGIN}\n{END}\n")
    return page


def stored(directory: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    page = write_page(tmp_path_factory.mktemp("tuned"), TUNED)
    assert compare([page], QUIET) == 0
    return page


# the page's declaration


@pytest.mark.parametrize(
    "tune, message",
    [
        ("[tune]\nseeds = 1\n", "names no setting to search"),
        ("[tune]\nlr = []\n", "lr must be a non-empty list"),
        ("[tune]\nlr = [0.1, 0.1]\n", "lists a value twice"),
        ("[tune]\nlr = [0.1]\nval_split = 0\n", "val_split must be a count >= 1"),
        ("[tune]\nlearning_rate = [0.1]\n", "unknown setting 'learning_rate'"),
        ("[tune]\nlr = [0.1]\nseeds = [1, 1]\n", "seed 1 is listed 2 times"),
        ("tune = 3\n", "tune must be a table"),
    ],
)
def test_a_bad_tune_table_is_one_line(tmp_path, tune, message):
    page = write_page(tmp_path, f"seeds = 1\n{tune}[base]\n{TINY}")
    with pytest.raises(PageError, match=message) as raised:
        parse_page(page)
    assert "\n" not in str(raised.value) and str(page) in str(raised.value)


def test_a_tuned_setting_that_a_variant_also_sets_is_refused(tmp_path):
    page = write_page(tmp_path, f"seeds = 1\n[base]\n{TINY}lr = 0.1\n{TUNE}")
    with pytest.raises(PageError, match="variant 'batchnorm' sets lr, which \\[tune\\] searches"):
        parse_page(page)


def test_more_trials_than_the_bound_are_refused(tmp_path):
    values = ", ".join(str(0.01 * (i + 1)) for i in range(MAX_TRIALS // 2 + 1))
    page = write_page(tmp_path, f"seeds = 1\n[base]\n{TINY}[tune]\nlr = [{values}]\nseeds = 2\n")
    with pytest.raises(PageError, match=f"more than MAX_TRIALS = {MAX_TRIALS}"):
        parse_page(page)


def test_a_page_may_not_set_the_validation_split_itself(tmp_path):
    """A page reports on the test set; only [tune] holds out a split."""
    page = write_page(tmp_path, f"seeds = 1\n[base]\n{TINY}val_split = 100\n")
    with pytest.raises(PageError, match="unknown setting 'val_split'"):
        parse_page(page)


# the rule


LR = Tune({"lr": [1.0, 0.1, 0.3]}, [0], 100)


def test_the_highest_mean_score_is_chosen():
    scores = [({"lr": 1.0}, [0.80, 0.82]), ({"lr": 0.1}, [0.85, 0.84]), ({"lr": 0.3}, [0.9, 0.7])]
    assert choose(LR, scores) == {"lr": 0.1}


def test_a_tie_goes_to_the_smaller_value_whatever_the_listed_order():
    scores = [({"lr": 1.0}, [0.85]), ({"lr": 0.1}, [0.80]), ({"lr": 0.3}, [0.85])]
    assert choose(LR, scores) == {"lr": 0.3}


def test_a_diverged_trial_scores_zero():
    assert mean_score([None, 0.9]) == 0.45
    scores = [({"lr": 1.0}, [None, 0.95]), ({"lr": 0.1}, [0.6, 0.6]), ({"lr": 0.3}, [0.5, 0.5])]
    assert choose(LR, scores) == {"lr": 0.1}


def test_ties_over_several_settings_compare_in_the_table_order_and_words_by_position():
    tune = Tune({"activation": ["sigmoid", "relu"], "lr": [1.0, 0.1]}, [0], 100)
    scores = [
        ({"activation": "sigmoid", "lr": 1.0}, [0.8]),
        ({"activation": "sigmoid", "lr": 0.1}, [0.7]),
        ({"activation": "relu", "lr": 1.0}, [0.8]),
        ({"activation": "relu", "lr": 0.1}, [0.8]),
    ]
    assert choose(tune, scores) == {"activation": "sigmoid", "lr": 1.0}


def test_a_trial_scores_its_mean_over_the_last_epochs():
    epochs = [{"test_acc": value} for value in (0.1, 0.5, 0.6, 0.7, 0.8)]
    assert score({"status": "finished", "epochs": epochs}) == pytest.approx(0.7)
    assert SCORE_EPOCHS == 3
    assert score({"status": "finished", "epochs": epochs[:2]}) == pytest.approx(0.3)
    assert score({"status": "diverged", "epochs": epochs}) is None


# the protocol, end to end


def test_every_variant_gets_the_same_trials_on_the_validation_split(tuned):
    results = stored(tuned.parent / "results")
    trials = [r for r in results if r["config"]["val_split"]]
    assert len(trials) == 4  # 2 variants x 2 values x 1 tuning seed
    for norm in ("batchnorm", "layernorm"):
        mine = [r["config"] for r in trials if r["config"]["norm"] == norm]
        assert sorted(c["lr"] for c in mine) == [0.3, 1.0]
        assert {(c["seed"], c["val_split"]) for c in mine} == {(7, 200)}


def test_each_variant_reports_its_own_choice_on_the_whole_training_set(tuned):
    results = stored(tuned.parent / "results")
    trials = [r for r in results if r["config"]["val_split"]]
    reported = [r for r in results if not r["config"]["val_split"]]
    for norm in ("batchnorm", "layernorm"):
        # the rule, computed here from the stored trials
        means = {r["config"]["lr"]: statistics.fmean(e["test_acc"] for e in r["epochs"][-3:])
                 for r in trials if r["config"]["norm"] == norm}  # fmt: skip
        best = min(lr for lr, value in means.items() if value == max(means.values()))
        runs = [r["config"] for r in reported if r["config"]["norm"] == norm]
        assert sorted(c["seed"] for c in runs) == [0, 1]
        assert {c["lr"] for c in runs} == {best}
        assert f"| {norm} | " in tuned.read_text() and f"| lr={best} |" in tuned.read_text()


def test_a_tuned_page_is_in_step_and_rerunning_trains_nothing(tuned):
    assert check([tuned]) == []
    said: list[str] = []
    assert compare([tuned], QUIET, say=said.append) == 0
    assert "tuning trials and runs: 4 runs: 4 stored, 0 to run" in said[0]
    assert "runs of the tuned pages' choices: 4 runs: 4 stored, 0 to run" in said[1]
    assert said[-1].endswith("up to date")


def test_the_sensitivity_plot_is_drawn_and_is_the_pages_own(tuned):
    page = parse_page(tuned)
    plot = tuned.parent / "page-tuning.png"
    assert plot.is_file() and plot_problem(page, plot) is None
    assert "](page-tuning.png)" in tuned.read_text()


def test_check_reports_a_missing_trial(tuned, tmp_path):
    copy = write_page(tmp_path, TUNED)
    results = tmp_path / "results"
    results.mkdir()
    for path in (tuned.parent / "results").glob("*.json"):
        (results / path.name).write_bytes(path.read_bytes())
    trial = next(p for p in results.glob("*.json")
                 if json.loads(p.read_text())["config"]["val_split"])  # fmt: skip
    trial.unlink()
    (problem,) = check([copy])
    assert "1 of 4 tuning trials are not stored" in problem


def test_tuning_never_reads_the_test_set(tmp_path, monkeypatch):
    """With a test set that no computation can read, every trial still finishes; the reported
    runs, which do test, fail. With one job the runs happen in this process."""
    real_load = experiment.load_workload_data

    def load(*args, **kwargs):
        data = real_load(*args, **kwargs)
        return Dataset(data.train, Split(data.test.images.to("meta"), data.test.labels.to("meta")))

    monkeypatch.setattr(experiment, "load_workload_data", load)
    page = write_page(tmp_path, TUNED)
    failures = compare([page], CompareConfig(progress=False, jobs=1))
    results = stored(tmp_path / "results")
    assert len(results) == 4 and all(r["config"]["val_split"] == 200 for r in results)
    assert all(r["status"] == "finished" for r in results)
    assert failures == 4  # the reported runs: 2 variants x 2 seeds


def test_a_smoke_test_of_a_tuned_page_runs_its_trials_and_choices(tmp_path):
    page = write_page(tmp_path, TUNED)
    said: list[str] = []
    assert compare([page], CompareConfig(progress=False, smoke=True), say=said.append) == 0
    assert said[-1] == f"{page}: smoke test passed (6 runs)"  # 4 trials, 2 choices x 1 seed
    assert not (tmp_path / "results").exists()


def test_a_choice_at_the_edge_of_the_range_is_flagged():
    """The best of 0.1, 0.3, 1.0, 3.0 being 3.0 says little about 10: the page says so."""
    assert at_edge(LR, {"lr": 1.0}) and at_edge(LR, {"lr": 0.1})
    assert not at_edge(LR, {"lr": 0.3})
    assert not at_edge(Tune({"lr": [0.1, 1.0]}, [0], 100), {"lr": 1.0})  # two values: no edge
    words = Tune({"activation": ["sigmoid", "relu", "tanh"]}, [0], 100)
    assert not at_edge(words, {"activation": "sigmoid"})  # no order among words


def test_the_tuning_section_names_the_variants_chosen_at_an_edge(tuned):
    text = tuned.read_text()
    edge = "At the edge of the range searched" in text
    assert not edge  # two values searched: no edge is claimed
