"""`normzoo compare --verify`: stored runs rerun as they were made, compared bit for bit, and
nothing stored written."""

from __future__ import annotations

import json
from pathlib import Path

from normzoo import cli
from normzoo.compare.execute import PendingRun
from normzoo.compare.verify import choose, first_difference, verify
from normzoo.harness.config import RunConfig


def results(page: Path) -> dict[str, bytes]:
    """The page's result files by key, as bytes."""
    return {path.stem: path.read_bytes() for path in (page.parent / "results").glob("*.json")}


def test_stored_runs_rerun_exactly_and_nothing_is_written(page, capsys):
    before = results(page)
    assert cli.main(["compare", str(page), "--verify", "2"]) == 0
    out = capsys.readouterr().out
    assert "verifying 2 of 2 stored runs (drawn with --verify-seed " in out
    exact = [line.split(maxsplit=2) for line in out.splitlines() if line.startswith("exact ")]
    assert sorted(key for _, key, _ in exact) == sorted(before)
    assert {name for _, _, name in exact} == {"with bias seed 0", "without bias seed 0"}
    assert "2 runs: 2 exact, 0 not" in out
    assert results(page) == before


def test_a_changed_stored_number_is_reported_with_its_epoch_field_and_values(page, capsys):
    path = next((page.parent / "results").glob("*.json"))
    result = json.loads(path.read_text())
    stored = result["epochs"][0]["test_acc"]
    result["epochs"][0]["test_acc"] = stored + 1e-9  # a valid file, one number off
    path.write_text(json.dumps(result, indent=2))
    (verdict,) = verify([page], keys=[path.stem], say=lambda line: None)
    assert not verdict.exact and verdict.key == path.stem and verdict.elsewhere == ""
    assert verdict.difference == f"epoch 1 test_acc: stored {stored + 1e-9!r}, rerun {stored!r}"
    result["machine"] = "another CPU, 64 cores"  # made elsewhere: the verdict says so
    path.write_text(json.dumps(result, indent=2))
    assert cli.main(["compare", str(page), "--verify-run", path.stem]) == 1
    out = capsys.readouterr().out
    assert f"different  {path.stem}  {result['label']} seed 0: epoch 1 test_acc" in out
    assert "on another CPU, 64 cores, rerun with torch" in out
    assert "verify it where it was made" in out
    assert json.loads(path.read_text())["epochs"][0]["test_acc"] == stored + 1e-9  # kept


def test_a_seed_repeats_a_choice():
    runs = [PendingRun("label", RunConfig(seed=seed), f"key{seed}", Path()) for seed in range(20)]
    stored = [(run, run.config.seed) for run in runs]
    first = choose(stored, 3, [], seed=11)
    assert choose(stored, 3, [], seed=11) == first
    assert choose(stored, 3, [], seed=12) != first
    assert len(choose(stored, 50, [], seed=11)) == 20  # all of them, once each


def test_bad_verify_options_are_one_line(page, capsys):
    assert cli.main(["compare", str(page), "--verify-run", "0123456789abcdef"]) == 2
    error = capsys.readouterr().err
    assert "--verify-run 0123456789abcdef: no stored run" in error
    assert str(page.parent / "results") in error and error.count("\n") == 1
    for extra in (["--check"], ["--threads", "2"], ["--smoke"], ["--shard", "1/2"]):
        assert cli.main(["compare", str(page), "--verify", "1", *extra]) == 2
        assert "--verify reruns stored runs" in capsys.readouterr().err
    assert cli.main(["compare", str(page), "--verify-seed", "3"]) == 2
    assert "add --verify K" in capsys.readouterr().err


def test_first_difference_compares_bits_status_and_epoch_counts():
    epoch = {"epoch": 1, "train_loss": 0.0, "train_acc": 0.5, "test_acc": 0.5, "seconds": 1.0}
    stored = {"status": "finished", "epochs": [epoch]}
    slower = {"status": "finished", "epochs": [{**epoch, "seconds": 9.0}]}
    assert first_difference(stored, slower) is None  # timings are not results
    negative = {"status": "finished", "epochs": [{**epoch, "train_loss": -0.0}]}
    assert first_difference(stored, negative) == "epoch 1 train_loss: stored 0.0, rerun -0.0"
    diverged = {"status": "diverged", "epochs": []}
    assert first_difference(stored, diverged) == (
        "stored finished after 1 epoch, rerun diverged after 0 epochs"
    )
