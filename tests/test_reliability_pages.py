"""`normzoo compare` and `--check` on what a page's plots record, the numbers a stored result
holds, a page reached through a symbolic link, a page with CRLF line endings, and the length of
its messages."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import normzoo.compare as compare_module
from normzoo.compare import check, compare
from normzoo.compare.cache import ResultFileError, ResultStore, shape_problem
from normzoo.compare.page import BEGIN, END, PageError, find_pages, parse_page
from normzoo.errors import suggest

from .pages import QUIET, TINY, stored_results, write_page

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compare that starts a run fails the test: every run it needs is stored."""

    def trained(runs: list, *args: object, **kwargs: object) -> None:
        if runs:
            raise AssertionError(f"{len(runs)} runs were started although their results are stored")

    monkeypatch.setattr(compare_module, "run_all", trained)


# 1. A plot records which plot it is and what it was drawn from


def test_a_plot_copied_over_another_plot_of_the_page_is_reported(page):
    figures = page.parent
    shutil.copyfile(figures / "page-finals.png", figures / "page-curves.png")
    (problem,) = check([page])
    assert "page-curves.png" in problem and "finals" in problem
    assert f"run normzoo compare {page}" in problem and "\n" not in problem


def test_a_plot_drawn_from_older_results_is_reported(page, no_training):
    old = (page.parent / "page-finals.png").read_bytes()
    path = stored_results(page)[0]
    result = json.loads(path.read_text())
    result["epochs"][-1]["test_acc"] = 0.5  # the results change ...
    path.write_text(json.dumps(result))
    assert compare([page], QUIET) == 0 and check([page]) == []  # ... the page follows them
    (page.parent / "page-finals.png").write_bytes(old)  # and an old plot is put back
    (problem,) = check([page])
    assert "page-finals.png was drawn from other results" in problem
    assert f"run normzoo compare {page}" in problem
    assert compare([page], QUIET) == 0 and check([page]) == []


def test_a_plots_record_does_not_depend_on_where_it_is_drawn(page, compared, no_training):
    """The record is a digest of the data drawn, not of the pixels: a second compare, in
    another folder, records the same."""
    from PIL import Image

    assert compare([page], QUIET) == 0
    for name in ("page-curves.png", "page-finals.png"):
        with Image.open(page.parent / name) as one, Image.open(compared / name) as two:
            assert one.text == two.text and len(one.text) == 3


# 2. A stored result's numbers are numbers a run could have measured


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("test_acc", float("nan"), "epochs[0].test_acc is nan, not a finite number"),
        ("train_loss", float("inf"), "epochs[0].train_loss is inf, not a finite number"),
        ("examples_per_sec", float("-inf"), "epochs[0].examples_per_sec is -inf, not a finite"),
        ("epoch", float("nan"), "epochs[0].epoch is nan"),
        ("test_acc", 7.5, "epochs[0].test_acc is 7.5, not an accuracy in [0, 1]"),
        ("train_acc", -0.25, "epochs[0].train_acc is -0.25, not an accuracy in [0, 1]"),
        ("train_loss", -1.0, "epochs[0].train_loss is -1.0, not a loss >= 0"),
        ("examples_per_sec", 0, "epochs[0].examples_per_sec is 0, not a speed > 0"),
    ],
)
def test_a_number_no_run_could_measure_is_corrupt(page, field, value, says):
    path = stored_results(page)[0]
    result = json.loads(path.read_text())
    result["epochs"][0][field] = value
    path.write_text(json.dumps(result))  # NaN and Infinity as Python's json writes them
    (problem,) = check([page])
    assert f"{path} is not a normzoo result ({says}" in problem and "delete it" in problem
    with pytest.raises(ResultFileError, match="is not a normzoo result") as raised:
        compare([page], QUIET)
    assert str(path) in str(raised.value) and says in str(raised.value)


def test_every_committed_result_still_loads():
    paths = sorted((REPOSITORY / "docs" / "results").glob("*.json"))
    assert len(paths) >= 100
    store = ResultStore(REPOSITORY / "docs" / "results")
    for path in paths:
        assert shape_problem(json.loads(path.read_text())) is None, path
        assert store.load(path.stem) is not None


# 3. A page reached through a symbolic link is the page it links to


def test_a_symlinked_page_uses_its_real_folders_and_stays_a_link(page, no_training):
    real = page
    text = real.read_text()
    empty = text[: text.index(BEGIN) + len(BEGIN)] + "\n" + text[text.index(END) :]
    real.write_text(empty)  # the section to fill again, from the stored results
    real.chmod(0o640)
    (page.parent / "sub").mkdir()
    link = page.parent / "sub" / "link.md"
    link.symlink_to(Path("..") / real.name)
    assert compare([link], QUIET) == 0  # no run: the results are in the real page's folder
    assert link.is_symlink() and os.readlink(link) == str(Path("..") / real.name)
    assert not (page.parent / "sub" / "results").exists()
    assert real.read_text() == text  # the real page rewritten as it was compared
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert check([link]) == [] and check([real]) == []
    assert find_pages([page.parent]) == [real]  # one page, though two names lead to it


# 4. A page with CRLF line endings keeps them


def test_a_crlf_page_keeps_every_byte_outside_its_generated_section(page, no_training):
    text = page.read_text()
    empty = text[: text.index(BEGIN) + len(BEGIN)] + "\n" + text[text.index(END) :]
    before = empty.replace("\n", "\r\n").encode()
    page.write_bytes(before)
    assert compare([page], QUIET) == 0
    after = page.read_bytes()
    head = before[: before.index(BEGIN.encode()) + len(BEGIN)]
    tail = before[before.index(END.encode()) :]
    assert after.startswith(head) and after.endswith(tail)
    section = after[len(head) : len(after) - len(tail)]
    assert section.count(b"\n") > 5 and section.count(b"\n") == section.count(b"\r\n")
    lf_section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert section.replace(b"\r\n", b"\n") == lf_section.encode()  # what an LF page shows
    assert check([page]) == []
    assert compare([page], QUIET) == 0 and page.read_bytes() == after
    assert parse_page(page).block_line == 5  # write_page puts the fence on line 5


# 5. The footer's grammar, and an unknown name among many is one short line


def test_a_one_epoch_footer_says_epoch(compared):
    text = (compared / "page.md").read_text()
    assert "1 epoch each" in text and "1 epochs" not in text


def test_an_unknown_baseline_among_a_thousand_variants_is_a_short_line(tmp_path):
    values = ", ".join(str(0.001 * (n + 1)) for n in range(1000))
    path = write_page(tmp_path, f'seeds = 1\nbaseline = "lr=5"\n[base]\n{TINY}[grid]\n'
                                f"lr = [{values}]\n")  # fmt: skip
    with pytest.raises(PageError, match="unknown baseline 'lr=5'") as raised:
        parse_page(path)
    message = str(raised.value)
    assert len(message) < 300 and "and 995 more" in message, message


def test_suggest_lists_the_closest_few_of_many():
    names = [f"name{n}" for n in range(1000)]
    message = suggest("name", "name7x", names)
    assert message.startswith("unknown name 'name7x'; valid names: name7, ")
    assert message.endswith(", and 995 more") and len(message) < 200
    assert suggest("norm", "layernrom", ["layernorm", "batchnorm"]) == (
        "unknown norm 'layernrom'; valid norms: layernorm, batchnorm"
    )
