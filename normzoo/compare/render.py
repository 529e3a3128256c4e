"""The generated section of a page (a Markdown table and a footer) and its PNG plots.

Rendering is deterministic: fixed decimals, the page's variant order, no timestamps, so
``normzoo compare --check`` can compare a page with what its stored results give.

Plots are named after the page's file name, so two pages of one name in different folders
that share a ``figures`` folder would write the same plots. Each plot records the page it was
drawn for (a PNG text chunk, :data:`PAGE_KEYWORD`): a page never writes over the plot of
another page that claims it (:func:`render_plots`), and ``--check`` reports a page whose plot
names another page (:func:`plot_owner`) and pages that would share a plot
(:func:`shared_plots`). Each plot also records which of the page's plots it is
(:data:`PLOT_KEYWORD`) and a digest of the numbers it was drawn from (:data:`DATA_KEYWORD`,
:func:`plot_digest`), not of its pixels, which differ between matplotlib versions: ``--check``
reports a plot copied over another of the page's, and one kept from results since changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from normzoo.compare.page import Page, PageError, parse_page
from normzoo.compare.summary import (
    FAMILY_ERROR,
    LAST_EPOCHS,
    LEVEL,
    Interval,
    VariantSummary,
    comparisons,
)
from normzoo.compare.tune import SCORE_EPOCHS, Tuning, describe, mean_score
from normzoo.errors import NormzooError
from normzoo.harness.runs import atomic_write_bytes

#: The keyword of the PNG text chunk in which a plot records its page: the page's path
#: relative to the plot's folder, so the record survives moving the whole tree.
PAGE_KEYWORD = "normzoo page"
#: The keyword of the PNG text chunk naming which plot it is: ``curves``, ``finals``, ...
PLOT_KEYWORD = "normzoo plot"
#: The keyword of the PNG text chunk holding :func:`plot_digest` of what the plot was drawn from.
DATA_KEYWORD = "normzoo data"


def _number(value: float, decimals: int = 3, sign: bool = False) -> str:
    if math.isnan(value):
        return "n/a"
    if sign:
        # The sign of the unrounded value: an interval bound of -0.00006 reads "-0.000", so
        # an interval that crosses zero never reads as if it only touched it.
        return f"{'-' if value < 0 else '+'}{abs(value):.{decimals}f}"
    return f"{round(value, decimals) + 0.0:.{decimals}f}"  # no "-0.000" for a tiny negative


def _interval(interval: Interval, sign: bool = False) -> str:
    if interval.n < 2:
        return "n/a"
    return f"[{_number(interval.low, sign=sign)}, {_number(interval.high, sign=sign)}]"


def _mean_std(interval: Interval, decimals: int = 3) -> str:
    if interval.n == 0:
        return "n/a"
    if interval.n == 1:
        return _number(interval.mean, decimals)
    return f"{_number(interval.mean, decimals)} ± {_number(interval.std, decimals)}"


def _p_value(p: float | None) -> str:
    """3 decimals, cut rather than rounded: a p just below the level (0.04996) reads 0.049,
    not a 0.050 beside the verdict "better"."""
    if p is None:
        return "n/a"
    if p < 0.001:
        return "<0.001"
    return f"{math.floor(p * 1000) / 1000:.3f}"


def figure_paths(page: Page) -> dict[str, Path]:
    """Where each of the page's plots is written."""
    return {plot: page.figures_dir / f"{page.path.stem}-{plot}.png" for plot in page.plots}


def _same_file(one: Path, two: Path) -> bool:
    return one.resolve() == two.resolve()


def shared_plots(pages: Sequence[Page]) -> list[str]:
    """One line for each two of ``pages`` that would write the same plot file, naming both."""
    first: dict[Path, Page] = {}
    lines = []
    reported: set[tuple[Path, Path]] = set()
    for page in pages:
        for path in figure_paths(page).values():
            other = first.setdefault(path.resolve(), page)
            pair = (other.path.resolve(), page.path.resolve())
            if other is not page and pair not in reported:
                reported.add(pair)
                lines.append(_shared_line(page, path, other.path))
    return lines


def _shared_line(page: Page, path: Path, other: Path) -> str:
    return (
        f"{page.where()}: its plot {os.path.normpath(path)} is also the plot of {other}: "
        "plots are named after the page's file name; give one of the two pages another "
        "`figures` folder"
    )


def plot_record(path: Path) -> dict[str, str]:
    """The PNG text chunks of the plot at ``path`` (:data:`PAGE_KEYWORD`, :data:`PLOT_KEYWORD`,
    :data:`DATA_KEYWORD` for a plot that ``normzoo compare`` drew). :class:`NormzooError` for a
    file that is not a readable PNG."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return dict(image.text)  # reads the chunks after the image data too
    except (OSError, SyntaxError, ValueError) as error:
        raise NormzooError(f"plot {path} is not a readable PNG ({error})") from None


def plot_owner(path: Path) -> Path | None:
    """The page that the plot at ``path`` was drawn for, as it records it; ``None`` for a PNG
    that does not record it (not drawn by ``normzoo compare``). :class:`NormzooError` for a
    file that is not a readable PNG."""
    mark = plot_record(path).get(PAGE_KEYWORD)
    return None if mark is None else Path(os.path.normpath(path.parent / mark))


def plot_problem(page: Page, plot: Path, digest: str | None = None) -> str | None:
    """A line if the plot file ``plot`` of ``page`` is not known to be the page's own: not a
    readable PNG, drawn for another page, or not saying for which (not drawn by normzoo
    compare); another of the page's plots (its name is not the one the file is named after);
    or, given the ``digest`` of what it should be drawn from (:func:`plot_digest`), drawn from
    other results. ``None`` when it is the page's and, with a ``digest``, up to date."""
    rerun = f"run normzoo compare {page.path}"
    try:
        record = plot_record(plot)
    except NormzooError as error:
        return f"{page.where()}: {error}; {rerun}"
    mark = record.get(PAGE_KEYWORD)
    if mark is None:
        return (
            f"{page.where()}: plot {plot} does not record the page it was drawn for (not "
            f"drawn by normzoo compare); {rerun}"
        )
    owner = Path(os.path.normpath(plot.parent / mark))
    if not _same_file(owner, page.path):
        return (
            f"{page.where()}: plot {plot} was written by {owner}, not by this page; {rerun} "
            f"(if {owner} writes it too, give one of the two pages another `figures` folder)"
        )
    name = next((n for n, p in figure_paths(page).items() if _same_file(p, plot)), None)
    drawn = record.get(PLOT_KEYWORD)
    if drawn is None or DATA_KEYWORD not in record:
        return (
            f"{page.where()}: plot {plot} does not record which plot it is and what it was "
            f"drawn from (drawn by an older normzoo compare); {rerun}"
        )
    if name is not None and drawn != name:
        return (
            f"{page.where()}: plot {plot} is the page's {drawn} plot, not its {name} plot "
            f"(copied over it?); {rerun}"
        )
    if digest is not None and record[DATA_KEYWORD] != digest:
        return f"{page.where()}: plot {plot} was drawn from other results; {rerun}"
    return None


def plot_data(
    plot: str, summaries: list[VariantSummary], tunings: list[Tuning] | None = None
) -> Any:
    """What the drawer of ``plot`` reads, as JSON values: per variant (in the page's order) its
    label and, per seed in the order the drawer takes them, the numbers it draws."""
    if plot == "tuning":
        # a combination as [setting, value] pairs, in the order its label names them
        return [
            [t.label, [[list(map(list, values.items())), scores] for values, scores in t.scores],
             list(map(list, t.chosen.items()))]
            for t in tunings or []
        ]  # fmt: skip
    rows = []
    for summary in summaries:
        if plot == "curves":
            runs = [[seed, [[e["epoch"], e["test_acc"], e["train_acc"]] for e in r["epochs"]]]
                    for seed, r in summary.runs.items()]  # fmt: skip
        elif plot == "finals":
            runs = [[seed, r["status"], r["epochs"][-1]["test_acc"] if r["epochs"] else None]
                    for seed, r in sorted(summary.runs.items())]  # fmt: skip
        else:  # affine
            runs = [[seed, r["affine"]] for seed, r in sorted(summary.runs.items())]
        rows.append([summary.label, runs])
    return rows


def plot_digest(
    plot: str, summaries: list[VariantSummary], tunings: list[Tuning] | None = None
) -> str:
    """The sha256 of the plot's name and :func:`plot_data`, as canonical JSON: the same on
    every machine for the same stored results, and another whenever a drawn number changes."""
    canonical = json.dumps(
        [plot, plot_data(plot, summaries, tunings)],
        sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str,
    )  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def plot_digests(
    page: Page, summaries: list[VariantSummary], tunings: list[Tuning] | None = None
) -> dict[str, str]:
    """:func:`plot_digest` of each of the page's plots."""
    return {plot: plot_digest(plot, summaries, tunings) for plot in page.plots}


def _claims(page_path: Path, plot: Path) -> bool:
    """Whether the page at ``page_path`` exists and writes ``plot``."""
    try:
        return any(_same_file(plot, path) for path in figure_paths(parse_page(page_path)).values())
    except (PageError, OSError):
        return False  # gone, or no experiment any more: its old plots are anybody's


def render_section(page: Page, summaries: list[VariantSummary]) -> str:
    """The text between the page's markers, from its variants' summaries."""
    percent = f"{LEVEL:.0%}"
    own = {v.label: v.baseline for v in page.variants if v.baseline and v.baseline != v.label}
    versus_header = (
        f"paired difference ({percent}) to {page.baseline}, or as named" if own else
        f"vs {page.baseline} (paired, {percent})"
    )  # fmt: skip
    lines = [
        "",
        f"| variant | seeds | final test acc (mean ± std) | {percent} interval | "
        f"last-{LAST_EPOCHS} test acc | final train loss | examples/s | {versus_header} | "
        "Holm p | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in summaries:
        seeds = str(len(s.runs)) + (f" ({s.diverged} diverged)" if s.diverged else "")
        speed = "n/a" if s.examples_per_sec.n == 0 else f"{s.examples_per_sec.mean:,.0f}"
        lines.append(
            f"| {s.label} | {seeds} | {_mean_std(s.final_test)} | {_interval(s.final_test)} | "
            f"{_mean_std(s.last_epochs_test)} | {_mean_std(s.final_train_loss)} | {speed} | "
            f"{_versus(s, own)} |"
        )
    lines.append("")
    running = [s.running for s in summaries if s.running is not None]
    if running:
        lines += [
            "The same runs tested with the running averages kept during training (the "
            "chapter's protocol), before each test's re-estimation: the same weights, paired "
            "the same way.",
            "",
            f"| variant | running averages: final test acc (mean ± std) | {percent} interval | "
            f"last-{LAST_EPOCHS} test acc | {versus_header} | Holm p | verdict |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for s in running:
            lines.append(
                f"| {s.label} | {_mean_std(s.final_test)} | {_interval(s.final_test)} | "
                f"{_mean_std(s.last_epochs_test)} | {_versus(s, own)} |"
            )
        lines.append("")
    for plot, path in figure_paths(page).items():
        link = Path(os.path.relpath(path, page.path.parent)).as_posix()
        lines.append(f"![{_CAPTIONS[plot]}]({link})")
        lines.append("")
    lines.append(_footer(page, summaries))
    lines.append("")
    return "\n".join(lines)


def _versus(summary: VariantSummary, own: dict[str, str]) -> str:
    """The paired difference, Holm p and verdict cells of a row."""
    if summary.versus_baseline is None:
        return "baseline | — | —"
    versus = "n/a"
    if summary.versus_baseline.n:
        versus = (
            f"{_number(summary.versus_baseline.mean, sign=True)} "
            f"{_interval(summary.versus_baseline, sign=True)}"
        )
        if summary.label in own:
            versus += f" to {own[summary.label]}"
    return f"{versus} | {_p_value(summary.adjusted_p)} | {summary.verdict}"


_CAPTIONS = {
    "curves": "test and train accuracy per epoch: mean over seeds, each seed faint",
    "finals": "final test accuracy of each seed, per variant",
    "affine": "learned gamma and beta per norm layer (mean over channels, each seed)",
    "tuning": "tuning: validation score of each tried setting, per variant (its choice circled)",
}


def _footer(page: Page, summaries: list[VariantSummary]) -> str:
    results = [r for s in summaries for r in s.runs.values()]
    epochs = sorted({r["config"]["epochs"] for r in results})
    machines = sorted({f"{r['machine']} ({r['device']}, {r['threads']} torch thread"
                       f"{'s' if r['threads'] > 1 else ''} per run)" for r in results})  # fmt: skip
    hours = sum(r["seconds"] for r in results) / 3600
    seeds = ", ".join(str(seed) for seed in page.seeds)
    fewer = [f"{v.label} {', '.join(map(str, v.seeds))}" for v in page.variants if v.seeds]
    if fewer:
        seeds += "; their own seeds: " + "; ".join(fewer)
    plural = "s" if len(results) != 1 else ""
    own = any(v.baseline and v.baseline != v.label for v in page.variants)
    baselines = " (or to the variant its cell names)" if own else ""
    tested, untested = comparisons(summaries)
    verdicts = _verdicts(tested, untested, any(s.running for s in summaries))
    return (
        f"{len(results)} run{plural} (seeds {seeds}; {'/'.join(map(str, epochs))} "
        f"epoch{'s' if epochs != [1] else ''} each); "
        f"measured on {'; '.join(machines)}; {hours:.1f} h of run time in all. "
        f"Intervals: Student t over seeds; the paired column is the mean difference in final "
        f"test accuracy to {page.baseline}{baselines} over the same seeds. "
        f"{verdicts} Last-{LAST_EPOCHS}: per seed, the mean test accuracy of "
        f"the last {LAST_EPOCHS} epochs (all, for a shorter run). Generated by "
        f"`normzoo compare {page.path.name}` from the stored results in "
        f"`{Path(os.path.relpath(page.results_dir, page.path.parent)).as_posix()}/`."
    )


def _verdicts(tested: int, untested: int, both_tables: bool) -> str:
    """What the Holm p and verdict columns are, with the size of the family."""
    level = f"{FAMILY_ERROR:g}"
    family = f"{tested} paired comparison{'s' if tested != 1 else ''}"
    if both_tables:
        family += " (both tables)"
    not_tested = (
        f"; {untested} paired row{'s' if untested != 1 else ''} with fewer than 2 seeds in "
        "common cannot be tested (n/a)" if untested else ""
    )  # fmt: skip
    return (
        f"Verdicts: the page makes {family}, one family: each p-value (two-sided paired "
        f"t-test) is Holm-adjusted over the family at a family-wise error rate of {level}, and "
        f"the verdict comes from the adjusted p: better or worse (the sign of the difference) "
        f"below {level}, else no measurable difference{not_tested}."
    )


def render_plots(
    page: Page, summaries: list[VariantSummary], tunings: list[Tuning] | None = None
) -> None:
    """Write the page's plots (PNG) beside it, each recording the page, which plot it is and
    the digest of what it was drawn from (:func:`plot_digest`); a tuned page's ``tunings``
    draw its sensitivity plot.

    :class:`PageError` naming both pages, before any plot is written, when a plot file is
    another page's: it records that page, which still writes it.
    """
    for path in figure_paths(page).values():
        try:
            owner = plot_owner(path) if path.is_file() else None
        except NormzooError:
            owner = None  # not a readable plot: written over
        if owner is not None and not _same_file(owner, page.path) and _claims(owner, path):
            raise PageError(_shared_line(page, path, owner))

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    drawers = {
        "curves": partial(_curves, plt, summaries),
        "finals": partial(_finals, plt, summaries),
        "affine": partial(_affine, plt, summaries),
        "tuning": partial(_sensitivity, plt, tunings or []),
    }
    for plot, path in figure_paths(page).items():
        figure = drawers[plot]()
        buffer = io.BytesIO()
        mark = Path(os.path.relpath(page.path.resolve(), path.parent.resolve())).as_posix()
        record = {PAGE_KEYWORD: mark, PLOT_KEYWORD: plot,
                  DATA_KEYWORD: plot_digest(plot, summaries, tunings)}  # fmt: skip
        figure.savefig(buffer, format="png", metadata={"Software": None, **record})
        plt.close(figure)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())


def _sensitivity(plt, tunings: list[Tuning]):  # noqa: ANN001, ANN202
    """Each variant's score per tried combination, in the ``[tune]`` order; its choice
    circled. The combinations sit at even steps: the values tried are usually a log scale."""
    figure, axes = plt.subplots(figsize=(7, 4))
    for tuning_, color in zip(tunings, _colors(plt, len(tunings)), strict=True):
        combinations = [values for values, _ in tuning_.scores]
        scores = [mean_score(s) for _, s in tuning_.scores]
        axes.plot(range(len(scores)), scores, "o-", color=color, label=tuning_.label)
        chosen = combinations.index(tuning_.chosen)
        axes.plot([chosen], [scores[chosen]], "o", markersize=14, markerfacecolor="none",
                  markeredgecolor=color)  # fmt: skip
    if tunings:
        labels = [describe(values) for values, _ in tunings[0].scores]
        axes.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
    axes.set_ylabel(f"validation accuracy, mean of the last {SCORE_EPOCHS} epochs")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _colors(plt, count: int) -> list:  # noqa: ANN001
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def _curves(plt, summaries: list[VariantSummary]):  # noqa: ANN001, ANN202
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    for summary, color in zip(summaries, _colors(plt, len(summaries)), strict=True):
        for column, metric in enumerate(("test_acc", "train_acc")):
            curves = [r["epochs"] for r in summary.runs.values() if r["epochs"]]
            for epochs in curves:
                axes[column].plot([e["epoch"] for e in epochs], [e[metric] for e in epochs],
                                  color=color, alpha=0.2, linewidth=0.8)  # fmt: skip
            length = min((len(c) for c in curves), default=0)
            if length:
                mean = [sum(c[i][metric] for c in curves) / len(curves) for i in range(length)]
                label = summary.label if column == 0 else None
                axes[column].plot(range(1, length + 1), mean, color=color, linewidth=2,
                                  label=label)  # fmt: skip
    for column, title in enumerate(("test accuracy", "train accuracy")):
        axes[column].set_title(title)
        axes[column].set_xlabel("epoch")
        axes[column].grid(True, alpha=0.3)
    figure.legend(loc="lower center", ncol=min(4, len(summaries)), fontsize=8, frameon=False)
    rows = -(-len(summaries) // 4)
    figure.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    return figure


def _finals(plt, summaries: list[VariantSummary]):  # noqa: ANN001, ANN202
    figure, axes = plt.subplots(figsize=(max(5, 0.9 * len(summaries) + 2), 4), dpi=100)
    for index, summary in enumerate(summaries):
        values = [r["epochs"][-1]["test_acc"] for _, r in sorted(summary.runs.items())
                  if r["status"] == "finished" and r["epochs"]]  # fmt: skip
        axes.plot([index] * len(values), values, "o", color="tab:blue", alpha=0.6)
        if summary.final_test.n:
            axes.plot([index - 0.25, index + 0.25], [summary.final_test.mean] * 2, "k-")
    axes.set_xticks(range(len(summaries)))
    axes.set_xticklabels([s.label for s in summaries], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("final test accuracy")
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _affine(plt, summaries: list[VariantSummary]):  # noqa: ANN001, ANN202
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    learned = [s for s in summaries if any(r["affine"] for r in s.runs.values())]
    layers: list[str] = []
    for summary in learned:
        for result in summary.runs.values():
            layers += [name for name in result["affine"] if name not in layers]
    colors = _colors(plt, max(1, len(learned)))
    for offset, (summary, color) in enumerate(zip(learned, colors, strict=False)):
        shift = 0.15 * (offset - (len(learned) - 1) / 2)
        for column, parameter in enumerate(("weight", "bias")):
            for seed_index, (_, result) in enumerate(sorted(summary.runs.items())):
                present = [n for n in layers if f"{parameter}_mean" in result["affine"].get(n, {})]
                axes[column].errorbar(
                    [layers.index(n) + shift for n in present],
                    [result["affine"][n][f"{parameter}_mean"] for n in present],
                    yerr=[result["affine"][n][f"{parameter}_std"] for n in present],
                    fmt="o", color=color, alpha=0.7,
                    label=summary.label if seed_index == 0 else None,
                )  # fmt: skip
    for column, (title, frozen) in enumerate(
        (("gamma (weight): mean ± std over channels", 1.0),
         ("beta (bias): mean ± std over channels", 0.0))
    ):  # fmt: skip
        axes[column].axhline(frozen, color="gray", linestyle="--", linewidth=1,
                             label="initial (and frozen) value")  # fmt: skip
        axes[column].set_xticks(range(len(layers)))
        axes[column].set_xticklabels([f"norm {i + 1}\n(module {n})" for i, n in enumerate(layers)],
                                     fontsize=8)  # fmt: skip
        axes[column].set_title(title, fontsize=10)
        axes[column].grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure
