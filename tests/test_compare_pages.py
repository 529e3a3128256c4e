"""Comparison pages that cannot run as written are refused in one line, before anything trains.

A page's markers, seeds, variants and folders are checked when it is read (or, for what only
matters to a writing compare, before the first run starts): a bad page costs no training and
leaves the page as it was.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import normzoo.compare as compare_module
from normzoo.cli import main
from normzoo.compare import check, compare
from normzoo.compare.page import BEGIN, END, MAX_SEEDS, MAX_VARIANTS, PageError, parse_page

from .pages import QUIET, write_page


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compare that starts a run fails the test: a bad page is refused before training."""

    def trained(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run was started for a page that should have been refused")

    monkeypatch.setattr(compare_module, "run_all", trained)


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail, rather than hang, when the body takes longer than ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# 1. The generated section never reaches into the experiment block


BLOCK = "```normzoo\nseeds = 1\n```\n"

#: Pages whose markers compare cannot use: the text, then what the one line must say (the
#: line it names first, then fragments naming the other lines).
MISPLACED_MARKERS = {
    "around the block": (
        f"# A page\n{BEGIN}\n{BLOCK}{END}\n",
        2, ["lines 2 and 6", "experiment block (lines 3-5)"],
    ),
    "begin inside the block, as a TOML comment": (
        f"# A page\n```normzoo\nseeds = 1\n# {BEGIN}\n```\n\n{END}\n",
        4, ["lines 4 and 7", "experiment block (lines 2-5)"],
    ),
    "end inside the block": (
        f"# A page\n{BEGIN}\n```normzoo\n# {END}\nseeds = 1\n```\n",
        2, ["lines 2 and 4", "experiment block (lines 3-6)"],
    ),
    "doubled": (
        f"# A page\n{BLOCK}\n{BEGIN}\n{BEGIN}\n{END}\n{END}\n",
        6, [f"{BEGIN} appears 2 times (lines 6, 7)", "keep one pair"],
    ),
    "end before begin": (
        f"# A page\n{BLOCK}\n{END}\n{BEGIN}\n",
        6, [f"{END} (line 6) comes before {BEGIN} (line 7)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", MISPLACED_MARKERS)
def test_markers_that_enclose_cut_double_or_swap_are_refused_and_the_page_is_untouched(
    tmp_path, capsys, no_training, layout
):
    text, line, fragments = MISPLACED_MARKERS[layout]
    page = tmp_path / "page.md"
    page.write_text(text)
    before = page.read_bytes()

    assert main(["compare", str(page)]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"normzoo: error: {page}:{line}: ")
    for fragment in fragments:
        assert fragment in error
    assert page.read_bytes() == before

    assert main(["compare", "--check", str(page)]) == 1
    assert capsys.readouterr().err.splitlines() == [error.removeprefix("normzoo: error: ")]
    assert page.read_bytes() == before


def test_markers_above_the_block_are_as_good_as_markers_below_it(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# A page\n{BEGIN}\n{END}\n\n{BLOCK}")
    parsed = parse_page(page)
    assert parsed.generated == "\n"
    assert parsed.with_generated("table\n").endswith(BLOCK)


# 7. Each seed once


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("seeds = [0, 0]\n", "seeds: seed 0 is listed 2 times"),
        (
            '[[variant]]\nlabel = "a"\nseeds = [1, 2, 1]\n',
            "variant 'a': seeds: seed 1 is listed 2 times",
        ),
    ],
)
def test_a_seed_listed_twice_is_refused_naming_the_seed(tmp_path, block, message):
    with pytest.raises(PageError, match=r"page\.md:5: ") as raised:
        parse_page(write_page(tmp_path, block))
    assert message in str(raised.value) and "list each seed once" in str(raised.value)


# 9. Bounded pages


def test_a_page_of_more_variants_than_the_bound_is_refused_naming_the_bound(tmp_path):
    rates = ", ".join(str(0.001 * i) for i in range(1, MAX_VARIANTS + 2))
    with pytest.raises(PageError, match=r"page\.md:5: ") as raised:
        parse_page(write_page(tmp_path, f"[grid]\nlr = [{rates}]\n"))
    assert f"{MAX_VARIANTS + 1} variants" in str(raised.value)
    assert f"more than MAX_VARIANTS = {MAX_VARIANTS}" in str(raised.value)


def test_a_huge_grid_is_refused_at_once_without_building_its_combinations(tmp_path):
    values = "[" + ", ".join(str(i) for i in range(1, 101)) + "]"
    keys = ("epochs", "batch_size", "train_subset", "test_subset", "precise_stats")
    grid = "".join(f"{key} = {values}\n" for key in keys)
    listed = '[[variant]]\nlabel = "a"\n[[variant]]\nlabel = "b"\n'
    with within(10), pytest.raises(PageError) as raised:
        parse_page(write_page(tmp_path, f"[grid]\n{grid}{listed}"))
    message = str(raised.value)
    assert "20000000000 variants (10000000000 [grid] combinations times 2 [[variant]]" in message


def test_a_page_at_the_bound_plans_in_well_under_a_second(tmp_path):
    rates = ", ".join(str(0.001 * i) for i in range(1, MAX_VARIANTS + 1))
    with within(5):
        page = parse_page(write_page(tmp_path, f"seeds = 1\n[grid]\nlr = [{rates}]\n"))
    assert len(page.variants) == MAX_VARIANTS


@pytest.mark.parametrize("block", ["seeds = 1000000000000\n", "[[variant]]\nseeds = 1001\n"])
def test_more_seeds_than_the_bound_is_one_line_not_a_memory_error(tmp_path, block):
    with pytest.raises(PageError, match=r"page\.md:5: ") as raised:
        parse_page(write_page(tmp_path, block))
    assert f"more than MAX_SEEDS = {MAX_SEEDS}" in str(raised.value)
    assert parse_page(write_page(tmp_path, f"seeds = {MAX_SEEDS}\n")).seeds[-1] == MAX_SEEDS - 1


# 13. Nothing trains for a page whose variants or folders cannot be used


def test_an_empty_variant_list_is_refused(tmp_path):
    with pytest.raises(PageError, match=r"page\.md:5: variant = \[\] lists no variants"):
        parse_page(write_page(tmp_path, "variant = []\n"))


@pytest.mark.parametrize(
    ("block", "key", "folder", "what"),
    [
        ('results = "notes.txt"\n', "results", "notes.txt", "is a file, not a folder"),
        ('figures = "notes.txt"\n', "figures", "notes.txt", "is a file, not a folder"),
        (
            'results = "notes.txt/results"\n', "results", "notes.txt/results",
            "is under {tmp}/notes.txt, which is a file, not a folder",
        ),
    ],
)  # fmt: skip
def test_a_folder_that_is_a_file_is_refused_before_anything_trains(
    tmp_path, no_training, block, key, folder, what
):
    (tmp_path / "notes.txt").write_text("not a folder\n")
    page = write_page(tmp_path, "seeds = 1\n" + block)
    before = page.read_bytes()
    with pytest.raises(PageError) as raised:
        compare([page], QUIET)
    message = str(raised.value)
    assert message.startswith(f"{page}:5: {key} = ") and "\n" not in message
    assert f"{tmp_path / folder} {what.format(tmp=tmp_path)}; " in message
    assert page.read_bytes() == before
    assert check([page]) == [message]


@pytest.mark.parametrize("key", ["results", "figures"])
def test_a_folder_that_cannot_be_written_is_refused_before_anything_trains(
    tmp_path, monkeypatch, no_training, key
):
    # the tests run as root, whom permissions do not stop: the folder reads as read-only
    folder = tmp_path / "out"
    folder.mkdir()
    real_access = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    page = write_page(tmp_path, f'seeds = 1\n{key} = "out"\n')
    with pytest.raises(PageError) as raised:
        compare([page], QUIET)
    message = str(raised.value)
    assert message.startswith(f"{page}:5: {key} folder {folder} is not writable; ")
    # --check writes nothing, so a read-only folder is not its problem
    assert all("not writable" not in problem for problem in check([page]))
