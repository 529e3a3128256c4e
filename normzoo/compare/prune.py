"""Stored results that no page uses: what ``normzoo compare --prune`` lists and deletes.

Results outlive the pages that made them: a page retuned, a variant withdrawn or a norm's
version bumped leaves its old result files in the shared results folder, where they look like
evidence and are not (an old file need not reproduce from today's code). A file is *unused*
when it sits in the results folder of one of the given pages and no given page plans its key
(:func:`~normzoo.compare.planned_runs`: a tuned page's trials and the runs of its choices).
Pages that share a folder must all be given, or their results count as unused; a tuned page
whose trials are not all stored does not know its reported runs yet, so it stops the search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from normzoo.compare import missing_trials, planned_runs
from normzoo.compare.page import find_pages, parse_page
from normzoo.errors import NormzooError


def unused_results(paths: Sequence[Path | str]) -> list[Path]:
    """The result files in the results folders of the pages at ``paths`` that none of these
    pages plans, sorted; a :class:`~normzoo.errors.NormzooError` when there is no page, or a
    tuned page has trials to run (its reported runs are not known until they are stored)."""
    pages = [parse_page(path) for path in sorted(find_pages(list(paths)))]
    if not pages:
        listed = ", ".join(map(str, paths))
        raise NormzooError(f"no page with a ```normzoo experiment block in {listed}")
    used: dict[Path, set[str]] = {}
    for page in pages:
        missing = missing_trials(page)
        if missing:
            raise NormzooError(
                f"{page.where()}: {missing} tuning trials are not stored, so the runs the page "
                f"reports are not known yet; run normzoo compare {page.path} first"
            )
        used.setdefault(page.results_dir.resolve(), set())
        for run in planned_runs(page):
            used.setdefault(run.results_dir.resolve(), set()).add(run.key)
    return sorted(
        path
        for folder, keys in used.items()
        for path in folder.glob("*.json")
        if path.stem not in keys
    )


def prune(paths: Sequence[Path | str], say: Callable[[str], None] = print) -> list[Path]:
    """Delete :func:`unused_results`, saying each file's path; the deleted paths."""
    unused = unused_results(paths)
    for path in unused:
        path.unlink()
        say(f"deleted {path}")
    return unused
