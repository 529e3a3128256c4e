"""`normzoo compare`: what a stored result and a plot must be before a page shows them.

A result file is used for a run only when it holds that run (its key and configuration) and
has the shape the table and plots read; a plot is a page's only when no other page writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from normzoo.compare import check, compare
from normzoo.compare.cache import ResultFileError
from normzoo.compare.page import PageError, find_pages, parse_page
from normzoo.compare.render import (
    DATA_KEYWORD,
    PLOT_KEYWORD,
    figure_paths,
    plot_problem,
    plot_record,
)

from .pages import QUIET, TINY, stored_results, write_page

REPOSITORY = Path(__file__).resolve().parents[1]


# 2: a result file is the result of the run it is named after


def test_swapped_result_files_are_refused_by_compare_and_check(page):
    one, two = stored_results(page)
    content_one, content_two = one.read_text(), two.read_text()
    one.write_text(content_two)
    two.write_text(content_one)
    (problem,) = check([page])  # the page's first result file that is not its run's
    assert str(one) in problem and "not the result of the run" in problem
    assert "delete it" in problem
    with pytest.raises(ResultFileError, match="delete it") as raised:
        compare([page], QUIET)
    assert str(one) in str(raised.value) and "\n" not in str(raised.value)


def test_a_stored_configuration_that_differs_from_the_run_is_refused(page):
    path = stored_results(page)[0]
    result = json.loads(path.read_text())
    result["config"]["lr"] = 0.5  # the key is the file's, the numbers another run's
    path.write_text(json.dumps(result))
    (problem,) = check([page])
    assert str(path) in problem and "lr" in problem and "delete it" in problem


def test_a_stored_key_other_than_the_file_name_is_refused(page):
    path = stored_results(page)[0]
    result = json.loads(path.read_text())
    result["key"] = "0123456789abcdef"
    path.write_text(json.dumps(result))
    (problem,) = check([page])
    assert str(path) in problem and "0123456789abcdef" in problem and "delete it" in problem


def test_results_written_before_workloads_existed_are_still_the_default_workloads(page):
    # the committed results lack "workload" and "workload_version" in their configuration
    for path in stored_results(page):
        result = json.loads(path.read_text())
        del result["config"]["workload"], result["config"]["workload_version"]
        path.write_text(json.dumps(result))
    assert check([page]) == []


def test_a_result_without_its_workload_is_not_taken_for_another_workloads(tmp_path):
    page = write_page(tmp_path, f'seeds = 1\n[base]\n{TINY}workload = "mlp"\n')
    assert compare([page], QUIET) == 0
    (path,) = (tmp_path / "results").glob("*.json")
    result = json.loads(path.read_text())
    del result["config"]["workload"]
    path.write_text(json.dumps(result))
    (problem,) = check([page])
    assert str(path) in problem and "workload" in problem and "delete it" in problem


# 12: a result file with a missing or wrong field is corrupt, named with the field


def _without(field: str):
    def edit(result: dict) -> None:
        del result[field]

    return edit


def _set(field: str, value: object):
    def edit(result: dict) -> None:
        result[field] = value

    return edit


def _set_epoch(field: str, value: object):
    def edit(result: dict) -> None:
        result["epochs"][0][field] = value

    return edit


def _replace_all(result: dict) -> None:
    key = result["key"]
    result.clear()
    result.update({"key": key, "epochs": [], "status": "finished"})


def _drop_bias_std(result: dict) -> None:
    for entry in result["affine"].values():
        del entry["bias_std"]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_replace_all, "config"),
        (_without("machine"), "machine"),
        (_without("status"), "status"),
        (_set("status", "done"), "status"),
        (_set("epochs", [{}]), "epochs[0]"),
        (_set("epochs", {"1": 0.5}), "epochs"),
        (_set_epoch("test_acc", "0.5"), "epochs[0].test_acc"),
        (_set_epoch("train_loss", None), "epochs[0].train_loss"),
        (_set_epoch("examples_per_sec", True), "epochs[0].examples_per_sec"),
        (_set("epochs", []), "epochs"),  # a finished run without its epochs
        (_set("seconds", "83.9"), "seconds"),
        (_set("threads", "1"), "threads"),
        (_set("device", None), "device"),
        (_set("affine", []), "affine"),
        (_drop_bias_std, "bias_std"),
        (_set("config", {"epochs": "1"}), "config"),
    ],
)
def test_an_incomplete_result_is_one_error_naming_the_file_and_field(page, edit, field):
    path = stored_results(page)[0]
    result = json.loads(path.read_text())
    edit(result)
    path.write_text(json.dumps(result))
    (problem,) = check([page])
    assert f"{path} is not a normzoo result" in problem and "delete it" in problem
    assert field in problem and "\n" not in problem
    with pytest.raises(ResultFileError, match="is not a normzoo result") as raised:
        compare([page], QUIET)
    assert str(path) in str(raised.value) and field in str(raised.value)


def test_results_that_are_not_json_objects_are_corrupt(page):
    path = stored_results(page)[0]
    for content in ("[]", "null", '"result"', "{"):
        path.write_text(content)
        (problem,) = check([page])
        assert f"{path} is not a normzoo result" in problem


# 3: a plot is its page's own


def two_pages_one_figures_folder(tmp_path: Path) -> tuple[Path, Path]:
    """``a/page.md`` and ``b/page.md``, both with their plots in ``figures/``."""
    block = f'seeds = 1\nfigures = "../figures"\n[base]\n{TINY}'
    one = write_page(tmp_path / "a", block)
    two = write_page(tmp_path / "b", block.replace("epochs = 1", "epochs = 1\nlr = 0.5"))
    return one, two


def test_pages_that_would_write_the_same_plots_are_one_problem_naming_both(tmp_path):
    one, two = two_pages_one_figures_folder(tmp_path)
    shared = [p for p in check([one, two]) if "also the plot of" in p]
    assert len(shared) == 1 and str(one) in shared[0] and str(two) in shared[0]
    assert str(tmp_path / "figures" / "page-curves.png") in shared[0]


def test_a_page_does_not_overwrite_the_plots_of_another_page(tmp_path):
    one, two = two_pages_one_figures_folder(tmp_path)
    assert compare([one], QUIET) == 0
    plot = tmp_path / "figures" / "page-curves.png"
    before = plot.read_bytes()
    with pytest.raises(PageError, match="also the plot of") as raised:
        compare([two], QUIET)
    assert str(one) in str(raised.value) and str(two) in str(raised.value)
    assert plot.read_bytes() == before
    assert check([one]) == []


def test_check_notices_a_plot_that_another_page_wrote(tmp_path):
    one, two = two_pages_one_figures_folder(tmp_path)
    assert compare([one], QUIET) == 0
    (tmp_path / "b" / "page.md").rename(tmp_path / "b" / "kept.md")  # out of compare's way
    assert compare([tmp_path / "b" / "kept.md"], QUIET) == 0
    (tmp_path / "figures" / "kept-curves.png").replace(tmp_path / "figures" / "page-curves.png")
    (problem,) = check([one])
    assert str(tmp_path / "b" / "kept.md") in problem and "written by" in problem
    assert "page-curves.png" in problem


def test_check_notices_a_plot_that_does_not_record_its_page(tmp_path):
    """A PNG that normzoo compare did not draw (saved by hand, an old plot) could be anybody's."""
    (page, _) = two_pages_one_figures_folder(tmp_path)
    assert compare([page], QUIET) == 0
    plot = tmp_path / "figures" / "page-finals.png"
    with Image.open(plot) as image:
        image.load()
        bare = image.copy()
    bare.save(plot)
    (problem,) = check([page])
    assert "page-finals.png does not record the page" in problem
    assert f"run normzoo compare {page}" in problem
    assert compare([page], QUIET) == 0 and check([page]) == []


def test_every_committed_plot_records_its_page_which_plot_it_is_and_its_data():
    """(Whether the recorded data are the stored results': `normzoo compare --check`.)"""
    paths = find_pages([REPOSITORY / "docs", REPOSITORY / "README.md", REPOSITORY / "examples"])
    plots = [(page, name, plot) for page in map(parse_page, paths)
             for name, plot in figure_paths(page).items()]  # fmt: skip
    assert len(plots) >= 19
    assert [plot_problem(page, plot) for page, _, plot in plots] == [None] * len(plots)
    for _, name, plot in plots:
        record = plot_record(plot)
        assert record[PLOT_KEYWORD] == name and len(record[DATA_KEYWORD]) == 64
