"""`normzoo compare --prune`: the result files that no page uses any more are found and deleted,
and nothing a page uses is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normzoo import cli
from normzoo.compare.prune import prune, unused_results
from normzoo.errors import NormzooError

from .pages import TINY, stored_results, write_page

ROOT = Path(__file__).resolve().parents[1]


def without_variant(page: Path, label: str) -> None:
    """Withdraw variant ``label`` from the page's block, as an author would."""
    text = page.read_text()
    start = text.index(f'[[variant]]\nlabel = "{label}"')
    end = text.index("```", start)
    page.write_text(text[:start] + text[end:])


def test_a_withdrawn_variants_results_are_unused_and_pruned_alone(page):
    kept, withdrawn = stored_results(page)
    assert unused_results([page]) == []
    without_variant(page, "without bias")
    assert unused_results([page]) == [withdrawn]
    said = []
    assert prune([page], say=said.append) == [withdrawn]
    assert said == [f"deleted {withdrawn}"]
    assert not withdrawn.exists() and json.loads(kept.read_text())["label"] == "with bias"
    assert unused_results([page]) == []


def test_results_of_a_page_left_out_count_as_unused(page):
    """Pages that share a folder are pruned together: the help says to give them all."""
    other = write_page(page.parent, 'seeds = 1\nbaseline = "b"\n\n[base]\n' + TINY
                       + '\n[[variant]]\nlabel = "b"\nlr = 0.5\n', name="other.md")  # fmt: skip
    assert sorted(unused_results([other])) == sorted(stored_results(page))
    assert unused_results([page, other]) == []  # other's run is not stored: nothing to prune


def test_a_tuned_page_with_trials_to_run_stops_the_search(tmp_path):
    tuned = write_page(tmp_path, 'seeds = 1\nbaseline = "batchnorm"\n\n[base]\n' + TINY
                       + "\n[tune]\nlr = [0.3, 1.0]\nseeds = [7]\nval_split = 200\n\n"
                       '[[variant]]\nnorm = "batchnorm"\n')  # fmt: skip
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "0123456789abcdef.json").write_text("{}")
    with pytest.raises(NormzooError, match="2 tuning trials are not stored") as raised:
        prune([tuned])
    assert f"run normzoo compare {tuned} first" in str(raised.value)
    assert (tmp_path / "results" / "0123456789abcdef.json").exists()


def test_prune_from_the_command_line_names_each_file(page, capsys):
    _, withdrawn = stored_results(page)
    without_variant(page, "without bias")
    assert cli.main(["compare", "--prune", str(page)]) == 0
    out = capsys.readouterr().out
    assert f"deleted {withdrawn}\n1 unused result file deleted\n" == out
    assert cli.main(["compare", "--prune", str(page)]) == 0
    assert capsys.readouterr().out == "0 unused result files deleted\n"


def test_prune_with_an_option_that_trains_is_one_line(page, capsys):
    for extra in (["--check"], ["--jobs", "2"], ["--smoke"], ["--shard", "1/2"]):
        assert cli.main(["compare", "--prune", str(page), *extra]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "--prune trains nothing" in line
    assert len(stored_results(page)) == 2


def test_every_committed_result_is_used_by_a_committed_page():
    """What `normzoo compare --prune docs README.md examples` would delete: nothing."""
    assert unused_results([ROOT / "docs", ROOT / "README.md", ROOT / "examples"]) == []
