"""Documentation-driven comparisons: pages that declare an experiment and show its results.

``normzoo compare PAGE`` runs every (variant, seed) of the page's experiment whose result is
not stored yet, then rewrites the page's generated section and plots from the stored results;
``--check`` renders from the stored results only and reports every page that is out of step.
Modules: :mod:`~normzoo.compare.page` (the page and its experiment block),
:mod:`~normzoo.compare.cache` (result files keyed by the resolved configuration),
:mod:`~normzoo.compare.execute` (running, in parallel processes),
:mod:`~normzoo.compare.summary` (statistics), :mod:`~normzoo.compare.render` (table, plots).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch

from normzoo.bench import page as bench_page
from normzoo.compare.cache import ResultStore, resolved_config, run_key
from normzoo.compare.execute import PendingRun, run_all
from normzoo.compare.page import Page, PageError, Variant, check_writable, find_pages, parse_page
from normzoo.compare.render import (
    figure_paths,
    plot_problem,
    render_plots,
    render_section,
    shared_plots,
)
from normzoo.compare.summary import VariantSummary, summarize
from normzoo.errors import NormzooError
from normzoo.harness.interrupts import stops_interrupt
from normzoo.harness.runs import atomic_write_bytes
from normzoo.workloads.slots import check_model_settings

__all__ = ["CompareConfig", "PageError", "check", "compare", "parse_shard"]

#: ``--smoke``: one seed and epoch per variant on this many training and test examples.
SMOKE_EXAMPLES = 512


@dataclass(frozen=True)
class CompareConfig:
    """How ``normzoo compare`` runs: ``jobs`` processes of ``threads`` torch threads each
    (``None``: the cores split evenly), only slice ``shard = (i, k)`` of the runs (1-based),
    or a ``smoke`` test (nothing stored beside the pages, no page rewritten)."""

    jobs: int = 1
    threads: int | None = None
    shard: tuple[int, int] | None = None
    smoke: bool = False
    progress: bool = True


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/k"`` with ``1 <= i <= k``."""
    try:
        i, k = (int(part) for part in text.split("/"))
    except ValueError:
        raise NormzooError(f"--shard must look like 2/4 (slice i of k), got {text!r}") from None
    if not 1 <= i <= k:
        raise NormzooError(f"--shard {text}: need 1 <= i <= k")
    return i, k


@dataclass(frozen=True)
class _PlannedRun:
    variant: Variant
    seed: int
    pending: PendingRun


def _plan(page: Page, smoke_dir: Path | None = None) -> list[_PlannedRun]:
    """Every (variant, seed) of ``page`` with its key; an unknown norm or option is a
    :class:`PageError` naming the page's experiment block."""
    planned = []
    for variant in page.variants:
        seeds = variant.seeds or page.seeds
        seeds = seeds[:1] if smoke_dir else seeds
        try:  # a setting or option that no run could use fails here, before any training
            check_model_settings(variant.config(seeds[0]))
        except (NormzooError, TypeError) as error:
            raise PageError(f"{page.where()}: variant {variant.label!r}: {error}") from None
        for seed in seeds:
            try:
                config = variant.config(seed)
                if smoke_dir:
                    config = replace(
                        config, epochs=1, precise_stats=min(config.precise_stats, 2),
                        train_subset=SMOKE_EXAMPLES, test_subset=SMOKE_EXAMPLES,
                    )  # fmt: skip
                config.validate()
                key = run_key(resolved_config(config))
            except (NormzooError, TypeError) as error:
                raise PageError(f"{page.where()}: variant {variant.label!r}: {error}") from None
            directory = smoke_dir or page.results_dir
            planned.append(_PlannedRun(variant, seed, PendingRun(variant.label, config, key,
                                                                 directory)))  # fmt: skip
    return planned


def _seed_major(plans: Iterable[list[_PlannedRun]]) -> list[PendingRun]:
    """The runs of every page, seed by seed: seed 0 of every variant, then seed 1 ... A
    comparison stopped part-way (or a budget that runs out) leaves the variants with the same
    seeds, which pair, rather than some variants complete and others missing. Within a seed
    the order is the pages' (sorted by path by the caller) and their blocks', so ``--shard``
    slices agree between machines."""
    planned = [run for runs in plans for run in runs]
    return [run.pending for run in sorted(planned, key=lambda run: run.seed)]


def _summaries(page: Page, planned: list[_PlannedRun]) -> tuple[list[VariantSummary], int]:
    """The summary of each variant from the stored results, and how many runs are missing.

    A stored result must be the run's (its key and configuration) and hold what the table and
    plots read; :class:`~normzoo.compare.cache.ResultFileError` names a file that does not.
    """
    by_variant: dict[str, dict[int, dict[str, Any]]] = {v.label: {} for v in page.variants}
    missing = 0
    for run in planned:
        store = ResultStore(run.pending.results_dir)
        result = store.load(run.pending.key, resolved_config(run.pending.config))
        if result is None:
            missing += 1
        else:
            by_variant[run.variant.label][run.seed] = result
    summaries = []
    for variant in page.variants:
        baseline = variant.baseline or page.baseline
        paired = None if baseline == variant.label else by_variant[baseline]
        summaries.append(summarize(variant.label, by_variant[variant.label], paired))
    return summaries, missing


def compare(
    paths: Sequence[Path | str],
    config: CompareConfig = CompareConfig(),
    say: Callable[[str], None] = print,
) -> int:
    """Run what is missing for the pages at ``paths`` and rewrite their generated sections.

    Returns the number of runs that failed (0 when all is well). Every finished run is stored
    the moment it ends, so an interrupted comparison loses nothing finished and a second call
    runs only what is still missing. A page is rewritten once all its runs are stored, keeping
    its permission bits. A page that cannot be parsed, that cannot be written, or whose
    results or plots' folder cannot be written, is a :class:`PageError` before anything trains.

    Ctrl-C or SIGTERM raise :class:`KeyboardInterrupt` (SIGTERM:
    :class:`~normzoo.harness.interrupts.RunInterrupted` with its ``signal_number``) once the
    worker processes are stopped and the temporary folders removed. SIGKILL cannot be handled:
    the workers then exit by themselves, but a ``--smoke`` scratch folder (``normzoo-smoke-*``)
    and, with one job, the runs' ``normzoo-compare-*`` folder stay in the temporary directory.
    """
    pages = [parse_page(path) for path in find_pages(list(paths))]
    if not pages:
        raise NormzooError(f"no page with a ```normzoo experiment block in {_listed(paths)}")
    # a smoke test stores its results in a scratch folder, made where SIGTERM removes it; a
    # real comparison makes none
    smoke = partial(tempfile.TemporaryDirectory, prefix="normzoo-smoke-")
    with stops_interrupt(), (smoke if config.smoke else nullcontext)() as scratch:
        smoke_dir = Path(scratch) if scratch else None
        plans = {page.path: _plan(page, smoke_dir) for page in pages}
        unique: dict[tuple[Path, str], PendingRun] = {}
        for run in _seed_major(plans[path] for path in sorted(plans)):
            unique.setdefault((run.results_dir, run.key), run)
        ordered = list(unique.values())
        if config.shard:
            i, k = config.shard
            ordered = ordered[i - 1 :: k]
        todo = [run for run in ordered if not ResultStore(run.results_dir).has(run.key)]
        if not config.smoke:  # a smoke test writes nothing beside the pages
            # checked now, not when the first result or plot is stored after training
            to_store = {run.results_dir for run in todo}
            for page in pages:
                check_writable(page, results=page.results_dir in to_store)
                if not os.access(page.path, os.W_OK):  # rewritten once its runs are stored
                    raise PageError(f"{page.path}: the page is not writable; make it writable "
                                    "or run a copy")  # fmt: skip
        jobs = max(1, min(config.jobs, len(todo)))
        # torch's thread count honours OMP_NUM_THREADS; the jobs share it
        threads = config.threads or max(1, torch.get_num_threads() // jobs)
        say(
            f"{counted(len(ordered), 'run')}: {len(ordered) - len(todo)} stored, {len(todo)} to "
            f"run ({counted(jobs, 'process', 'processes')}, {counted(threads, 'thread')} each)"
        )
        failures = _run_with_progress(todo, jobs, threads, config.progress, say)
        for page in pages:
            summaries, missing = _summaries(page, plans[page.path])
            if missing:
                say(f"{page.path}: {missing} runs still missing; page not rewritten")
                continue
            section = render_section(page, summaries)
            if config.smoke:
                say(f"{page.path}: smoke test passed ({len(plans[page.path])} runs)")
                continue
            render_plots(page, summaries)
            # the page is read again: text edited while the runs went on stays as edited
            fresh = parse_page(page.path)
            if fresh.variants != page.variants or fresh.seeds != page.seeds:
                say(f"{page.path}: its experiment changed while running; run again")
            elif section != fresh.generated:
                mode = stat.S_IMODE(os.stat(page.path).st_mode)
                atomic_write_bytes(page.path, fresh.with_generated(section).encode())
                os.chmod(page.path, mode)  # a new file: the page's own permissions, not umask's
                say(f"{page.path}: results updated")
            else:
                say(f"{page.path}: up to date")
    return failures


def _run_with_progress(
    todo: list[PendingRun], jobs: int, threads: int, progress: bool, say: Callable[[str], None]
) -> int:
    from tqdm import tqdm

    failures = stored = 0  # counted here: a disabled bar counts nothing
    bar = tqdm(total=len(todo), unit="run", disable=not progress or not todo, file=sys.stderr)

    def done(run: PendingRun, result: dict[str, Any] | None, error: BaseException | None) -> None:
        nonlocal failures, stored
        if error is not None:
            failures += 1
            bar.write(f"failed: {run.label} seed {run.config.seed}: {error}")
        else:
            stored += 1
            test = result["epochs"][-1]["test_acc"] if result["epochs"] else float("nan")
            bar.set_postfix_str(f"{run.label} seed {run.config.seed}: {result['status']}, "
                                f"test {test:.3f}")  # fmt: skip
        bar.update(1)

    try:
        run_all(todo, jobs, threads, done)
    except KeyboardInterrupt:
        bar.close()
        say(f"interrupted: {stored} of {len(todo)} runs finished and stored; run the same "
            "command again to resume")  # fmt: skip
        raise
    bar.close()
    return failures


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun, singular for one: ``counted(1, "run")`` is ``"1 run"``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _listed(paths: Sequence[Path | str]) -> str:
    return ", ".join(map(str, paths))


def checked_pages(paths: Sequence[Path | str]) -> int:
    """How many pages :func:`check` reads at ``paths``: experiment pages and bench pages."""
    return len(set(find_pages(list(paths))) | set(bench_page.find_pages(list(paths))))


def check(paths: Sequence[Path | str]) -> list[str]:
    """Problems with the pages at ``paths``, one line each (empty: all in step).

    Renders every page from its stored results only, never trains. A problem is a page that
    cannot be parsed, names an unknown norm or option, misses a run, has a result file that is
    not its run's or lacks a field (:meth:`~normzoo.compare.cache.ResultStore.load`), lacks a
    plot or has a plot that does not record this page as the one it was drawn for, shares a
    plot file with another of the pages, or whose generated section differs from what its
    stored results give (the first differing line); also a ``normzoo bench`` section that
    differs from its stored measurement (:func:`normzoo.bench.page.check`).
    """
    problems = bench_page.check(list(paths))
    pages = find_pages(list(paths))
    if not pages and not bench_page.find_pages(list(paths)):
        problems.append(f"no page with a ```normzoo experiment block in {_listed(paths)}")
    parsed = []
    for path in pages:
        try:
            page = parse_page(path)
            parsed.append((page, _plan(page)))
        except PageError as error:
            problems.append(str(error))
    problems += shared_plots([page for page, _ in parsed])
    plotted = [path.resolve() for page, _ in parsed for path in figure_paths(page).values()]
    for page, planned in parsed:
        try:
            summaries, missing = _summaries(page, planned)
        except NormzooError as error:
            problems.append(f"{page.where()}: {error}")
            continue
        if missing:
            problems.append(f"{page.where()}: {missing} of {len(planned)} runs are not stored; "
                            f"run normzoo compare {page.path}")  # fmt: skip
            continue
        expected = render_section(page, summaries).split("\n")
        found = page.generated.split("\n")
        for offset, (want, have) in enumerate(zip_longest(expected, found)):
            if want != have:
                problems.append(
                    f"{page.where(page.generated_line + offset)}: generated section differs "
                    f"from the stored results: expected {want!r}, found {have!r}; run "
                    f"normzoo compare {page.path}"
                )
                break
        for plot in figure_paths(page).values():
            if not plot.is_file():
                problems.append(f"{page.where()}: plot {plot} is missing; run normzoo compare "
                                f"{page.path}")  # fmt: skip
            elif plotted.count(plot.resolve()) == 1:  # a shared plot is reported above
                problem = plot_problem(page, plot)
                problems += [problem] if problem else []
    return problems
