"""A run that re-estimates its norms' statistics before each test also tests the same weights
with the running averages kept during training (the chapter's protocol), so one run answers
for both protocols; a page whose runs all record it shows both, paired and in one family."""

from __future__ import annotations

import torch

from normzoo.compare.cache import shape_problem
from normzoo.compare.summary import (
    RUNNING_AVERAGES,
    adjust_for_multiplicity,
    comparisons,
    record_running_averages,
    summarize,
)
from normzoo.harness.train import train
from normzoo.workloads.data import load_fashion_mnist

from .conftest import lenet


def _data():
    return load_fashion_mnist().subset(2048, 1000)


def _train(precise_batches: int, epochs: int = 2):
    torch.manual_seed(0)
    model = lenet("batchnorm")
    history = train(model, _data(), epochs=epochs, lr=0.5, batch_size=64, seed=0,
                    label="batchnorm", progress=False, precise_batches=precise_batches)  # fmt: skip
    return model, history


def test_the_extra_test_changes_nothing_the_run_trains_or_reports():
    _, book = _train(precise_batches=0)
    _, both = _train(precise_batches=4)
    for plain, reestimated in zip(book, both, strict=True):
        assert plain.train_loss == reestimated.train_loss
        assert plain.train_acc == reestimated.train_acc
    # the first epoch's running averages are those of the run that never re-estimates
    assert both[0].running_test_acc == book[0].test_acc
    assert all(epoch.running_test_acc is None for epoch in book)
    assert all("running_test_acc" not in epoch.as_dict() for epoch in book)


def _result(finals: list[float], running: list[float] | None) -> dict:
    epochs = []
    for index, final in enumerate(finals):
        epoch = {"epoch": index + 1, "train_loss": 0.5, "train_acc": 0.8, "test_acc": final,
                 "examples_per_sec": 1000.0, "seconds": 1.0}  # fmt: skip
        if running is not None:
            epoch["running_test_acc"] = running[index]
        epochs.append(epoch)
    return {"status": "finished", "epochs": epochs}


def test_the_running_rows_pair_the_same_seeds_and_share_the_family():
    base = {seed: _result([0.80 + 0.001 * seed], [0.70 + 0.002 * seed]) for seed in range(5)}
    other = {seed: _result([0.85 + 0.001 * seed], [0.70 + 0.003 * seed]) for seed in range(5)}
    summaries = []
    for label, runs, paired in (("base", base, None), ("other", other, base)):
        summary = summarize(label, runs, paired)
        running = summarize(label, runs, paired, RUNNING_AVERAGES)
        summaries.append(summary.__class__(**{**summary.__dict__, "running": running}))
    adjusted = adjust_for_multiplicity(summaries)
    other_row = adjusted[1]
    assert abs(other_row.versus_baseline.mean - 0.05) < 1e-12
    assert abs(other_row.running.versus_baseline.mean - 0.002) < 1e-12  # mean of 0.001 * seed
    assert abs(other_row.running.final_test.mean - 0.706) < 1e-12
    assert comparisons(adjusted) == (2, 0)
    # Holm over the two: the smaller p doubled, the larger at least that
    raw = sorted([other_row.versus_baseline.p_value, other_row.running.versus_baseline.p_value])
    assert min(other_row.adjusted_p, other_row.running.adjusted_p) == min(1.0, 2 * raw[0])


def test_a_page_shows_the_running_averages_only_when_every_run_records_them():
    assert record_running_averages([_result([0.8, 0.81], [0.7, 0.71])])
    assert not record_running_averages([_result([0.8], [0.7]), _result([0.8], None)])
    assert not record_running_averages([])


def test_a_stored_running_average_must_be_an_accuracy():
    result = {"key": "k", "config": {"epochs": 1}, "status": "finished", "affine": {},
              "seconds": 1.0, "machine": "m", "device": "cpu", "threads": 1,
              "epochs": _result([0.8], [0.7])["epochs"]}  # fmt: skip
    assert shape_problem(result) is None
    result["epochs"][0]["running_test_acc"] = 7.5
    assert "running_test_acc is 7.5, not an accuracy in [0, 1]" in shape_problem(result)


def test_a_reestimating_page_shows_both_tables_and_a_book_page_one(tmp_path):
    from normzoo.compare import CompareConfig, compare

    from .pages import TINY, two_arms, write_page

    block = two_arms(seeds=2)
    both = write_page(tmp_path, block, "both.md")
    book = write_page(
        tmp_path,
        block.replace(TINY, TINY.replace("precise_stats = 2", "precise_stats = 0")),
        "book.md",
    )
    assert compare([both, book], CompareConfig(progress=False)) == 0
    shown = both.read_text()
    assert "The same runs tested with the running averages" in shown
    assert "makes 2 paired comparisons (both tables), one family" in shown
    assert shown.count("| without bias |") == 2
    plain = book.read_text()
    assert "running averages" not in plain and "makes 1 paired comparison, one family" in plain
