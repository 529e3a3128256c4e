"""The re-estimation counts examples, so every batch size re-estimates on about the same data;
its older spelling in batches still works, and results computed the same way keep their keys."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from normzoo.compare.cache import resolved_config, run_key
from normzoo.compare.page import parse_page
from normzoo.errors import NormzooError
from normzoo.harness.config import PRECISE_BATCHES, RunConfig

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("batch_size", [16, 64, 256, 1024])
def test_every_batch_size_reestimates_on_the_same_examples_by_default(batch_size):
    config = RunConfig(batch_size=batch_size)
    assert config.precise_examples == PRECISE_BATCHES * 256
    assert config.precise_batches * batch_size >= config.precise_examples
    assert (config.precise_batches - 1) * batch_size < config.precise_examples


def test_the_older_spelling_counts_batches():
    assert RunConfig(precise_stats=2, batch_size=64).precise_examples == 128
    assert RunConfig(precise_stats=0).precise_examples == 0
    # replace keeps the examples: the batches were converted once, at construction
    assert replace(RunConfig(precise_stats=2), epochs=3).precise_examples == 512
    with pytest.raises(NormzooError, match="precise_stats must be >= 0"):
        RunConfig(precise_stats=-1)


def test_a_result_computed_as_before_keeps_its_key():
    """The README's batchnorm seed 0 (default settings), stored, and a page's
    `precise_stats = 0` run, as keyed before the count became examples."""
    stored = {}
    for path in (REPOSITORY / "docs" / "results").glob("*.json"):
        result = json.loads(path.read_text())
        stored[path.stem] = result["config"]
    default = run_key(resolved_config(RunConfig(norm="batchnorm", seed=0)))
    assert default in stored and stored[default]["precise_stats"] == PRECISE_BATCHES
    book = run_key(resolved_config(RunConfig(norm="batchnorm", seed=0, precise_examples=0)))
    # the key under which that run was stored before the change (its file, no longer used by
    # any page, was deleted by `normzoo compare --prune`; git history has it)
    assert book == "2dd6c54d5667c62e"
    assert run_key(resolved_config(RunConfig(precise_stats=0))) == book


def test_a_new_count_at_a_small_batch_is_a_new_key():
    """At batch 16 the old default re-estimated on 50 batches (800 examples); the default
    now re-estimates on 12,800, another computation, so it may not reuse the old result."""
    before = resolved_config(RunConfig(batch_size=16, precise_stats=PRECISE_BATCHES))
    now = resolved_config(RunConfig(batch_size=16))
    assert before["precise_stats"] == 50 and now["precise_stats"] == 800
    assert run_key(before) != run_key(now)


def test_a_count_that_is_no_whole_number_of_batches_is_always_in_the_key():
    odd = resolved_config(RunConfig(batch_size=3))  # 12,800 examples: 4,267 batches of 3
    assert odd["precise_examples"] == 12_800 and "precise_stats" not in odd
    assert run_key(odd) != run_key(resolved_config(RunConfig(batch_size=3, precise_stats=50)))


def test_pages_take_both_spellings(tmp_path):
    page = tmp_path / "page.md"
    block = "seeds = 1\n[base]\nbatch_size = 64\n{}\n"
    end = "<!-- normzoo:results:begin -->\n<!-- normzoo:results:end -->\n"
    for setting, examples in (("precise_stats = 3", 192), ("precise_examples = 100", 100)):
        page.write_text(f"```normzoo\n{block.format(setting)}```\n{end}")
        (variant,) = parse_page(page).variants
        assert variant.config(0).precise_examples == examples


def test_the_command_line_takes_both_spellings_but_not_together():
    from normzoo.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["run", "--precise-stats", "4", "--batch-size", "32"])
    assert args.precise_stats == 4
    from normzoo.cli import main

    assert main(["run", "--precise-stats", "1", "--precise-examples", "64"]) == 2
