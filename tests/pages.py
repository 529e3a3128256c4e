"""The small pages the compare tests write: a tiny training setting, a page of two variants,
how a page is written around its ``normzoo`` block, and where a compared page's results are."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from normzoo.compare import CompareConfig
from normzoo.compare.page import BEGIN, END

TINY = "epochs = 1\ntrain_subset = 256\ntest_subset = 128\nprecise_stats = 2\n"

QUIET = CompareConfig(progress=False)


def write_page(directory: Path, block: str, name: str = "page.md") -> Path:
    """Write page ``name`` in ``directory`` (made if missing): a heading, prose, ``block`` as
    its ``normzoo`` block (the fence on line 5), an empty generated section and prose after it."""
    directory.mkdir(parents=True, exist_ok=True)
    page = directory / name
    page.write_text(
        f"# A page\n\nWritten by hand.\n\n```normzoo\n{textwrap.dedent(block)}```\n\n"
        f"{BEGIN}\n{END}\n\nThe answer, by hand.\n"
    )
    return page


def two_arms(seeds: int = 1) -> str:
    """The block of a page comparing ``with bias`` (the baseline) and ``without bias`` before
    the norm, each trained ``TINY`` for ``seeds`` seeds."""
    return f"""\
seeds = {seeds}
baseline = "with bias"

[base]
{TINY}
[[variant]]
label = "with bias"

[[variant]]
label = "without bias"
bias_before_norm = false
"""


TWO_ARMS = two_arms()


def stored_results(page: Path) -> list[Path]:
    """The page's result files, the variant ``with bias`` first."""
    paths = list((page.parent / "results").glob("*.json"))
    return sorted(paths, key=lambda path: json.loads(path.read_text())["label"])
