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
from normzoo.compare.execute import PendingRun, run_all, scratch_folder
from normzoo.compare.page import Page, PageError, Variant, check_writable, find_pages, parse_page
from normzoo.compare.render import (
    figure_paths,
    plot_problem,
    render_plots,
    render_section,
    shared_plots,
)
from normzoo.compare.summary import (
    RUNNING_AVERAGES,
    VariantSummary,
    adjust_for_multiplicity,
    record_running_averages,
    summarize,
)
from normzoo.compare.tune import (
    Trial,
    Tuning,
    describe,
    render_tuning,
    trial_variant,
    trials,
    tuned_variants,
    tuning,
)
from normzoo.errors import NormzooError
from normzoo.harness.interrupts import mark_reported, stops_interrupt
from normzoo.harness.runs import atomic_write_bytes
from normzoo.harness.train import accuracy_label
from normzoo.workloads.slots import check_model_settings

__all__ = ["CompareConfig", "PageError", "check", "compare", "parse_shard"]

#: ``--smoke``: one seed and epoch per variant on this many training and test examples.
SMOKE_EXAMPLES = 512


#: Where a comparison's runs train: ``local`` processes (a pool of ``jobs``), or ``ray`` tasks
#: (:mod:`~normzoo.compare.ray_executor`: a local Ray instance, or the cluster at ``address``).
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class CompareConfig:
    """How ``normzoo compare`` runs: ``jobs`` processes of ``threads`` torch threads each
    (``None``: the cores split evenly), only slice ``shard = (i, k)`` of the runs (1-based),
    or a ``smoke`` test (nothing stored beside the pages, no page rewritten); on the
    ``executor`` named (:data:`EXECUTORS`), Ray's joining the cluster at ``address``."""

    jobs: int = 1
    threads: int | None = None
    shard: tuple[int, int] | None = None
    smoke: bool = False
    progress: bool = True
    executor: str = "local"
    address: str | None = None

    def check(self) -> None:
        """Refuse an unknown executor, an address without Ray, or Ray where it is missing,
        before anything trains."""
        if self.executor not in EXECUTORS:
            raise NormzooError(f"--executor {self.executor}: choose from {', '.join(EXECUTORS)}")
        if self.address is not None and self.executor != "ray":
            raise NormzooError(f"--address {self.address} is a Ray cluster's: add --executor ray")
        if self.executor == "ray":
            from normzoo.compare.ray_executor import check_reachable, import_ray

            import_ray()
            if self.address is not None:
                check_reachable(self.address)


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
    #: The tuning trial the run is, for a trial of a tuned page.
    trial: Trial | None = None


def _pending(page: Page, variant: Variant, seed: int, label: str, smoke_dir: Path | None
             ) -> PendingRun:  # fmt: skip
    """The run of ``variant`` with ``seed``, with its key; a setting no run could use is a
    :class:`PageError` naming the page's experiment block."""
    try:
        config = variant.config(seed)
        if smoke_dir:
            config = replace(
                config, epochs=1, precise_examples=min(config.precise_examples,
                                                       2 * config.batch_size),
                train_subset=SMOKE_EXAMPLES, test_subset=SMOKE_EXAMPLES,
            )  # fmt: skip
        config.validate()
        key = run_key(resolved_config(config))
    except (NormzooError, TypeError) as error:
        raise PageError(f"{page.where()}: variant {variant.label!r}: {error}") from None
    return PendingRun(label, config, key, smoke_dir or page.results_dir)


def _check_variants(page: Page) -> None:
    """A setting or option that no run could use fails here, before any training."""
    for variant in page.variants:
        try:
            check_model_settings(variant.config((variant.seeds or page.seeds)[0]))
        except (NormzooError, TypeError) as error:
            raise PageError(f"{page.where()}: variant {variant.label!r}: {error}") from None


def _plan(page: Page, smoke_dir: Path | None = None) -> list[_PlannedRun]:
    """Every (variant, seed) that ``page`` reports, with its key (a tuned page's variants must
    hold their choices: :func:`~normzoo.compare.tune.tuned_variants`)."""
    _check_variants(page)
    planned = []
    for variant in page.variants:
        seeds = variant.seeds or page.seeds
        for seed in seeds[:1] if smoke_dir else seeds:
            pending = _pending(page, variant, seed, variant.label, smoke_dir)
            planned.append(_PlannedRun(variant, seed, pending))
    return planned


def _plan_trials(page: Page, smoke_dir: Path | None = None) -> list[_PlannedRun]:
    """Every tuning trial of a tuned page (:func:`~normzoo.compare.tune.trials`)."""
    assert page.tune is not None
    _check_variants(page)
    planned = []
    for trial in trials(page):
        variant = trial_variant(trial.variant, trial.values, page.tune)
        pending = _pending(page, variant, trial.seed, trial.label, smoke_dir)
        planned.append(_PlannedRun(variant, trial.seed, pending, trial))
    return planned


def _tunings(page: Page, planned: list[_PlannedRun]) -> tuple[list[Tuning] | None, int]:
    """Each variant's tuning from the stored trials, or ``None`` and how many are missing."""
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    missing = 0
    for run in planned:
        assert run.trial is not None
        result = ResultStore(run.pending.results_dir).load(
            run.pending.key, resolved_config(run.pending.config)
        )
        if result is None:
            missing += 1
        else:
            results[run.trial.variant.label, describe(run.trial.values), run.seed] = result
    return (None, missing) if missing else (tuning(page, results), 0)


def missing_trials(page: Page) -> int:
    """How many of ``page``'s tuning trials are not stored (0 for a page without ``[tune]``)."""
    return _tunings(page, _plan_trials(page))[1] if page.tune else 0


def planned_runs(page: Page) -> list[PendingRun]:
    """Every run ``page`` plans, as :func:`compare` plans them: a tuned page's trials, and once
    they are all stored the runs with each variant's choice."""
    if page.tune is None:
        return [run.pending for run in _plan(page)]
    trials = _plan_trials(page)
    tunings, _ = _tunings(page, trials)
    reported = [] if tunings is None else _plan(_reported(page, tunings))
    return [run.pending for run in trials + reported]


def _reported(page: Page, tunings: list[Tuning] | None) -> Page:
    """The page whose runs the table reports: a tuned page's variants with their choices."""
    return page if tunings is None else replace(page, variants=tuned_variants(page, tunings))


def _seed_major(plans: Iterable[list[_PlannedRun]]) -> list[PendingRun]:
    """The runs of every page, seed by seed: seed 0 of every variant, then seed 1 ... A
    comparison stopped part-way (or a budget that runs out) leaves the variants with the same
    seeds, which pair, rather than some variants complete and others missing. Within a seed
    the order is the pages' (sorted by path by the caller) and their blocks', so ``--shard``
    slices agree between machines."""
    planned = [run for runs in plans for run in runs]
    return [run.pending for run in sorted(planned, key=lambda run: run.seed)]


def _summaries(page: Page, planned: list[_PlannedRun]) -> tuple[list[VariantSummary], int]:
    """The summary of each variant from the stored results (the page's paired rows adjusted
    together for multiplicity), and how many runs are missing.

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
    both = record_running_averages([r for runs in by_variant.values() for r in runs.values()])
    summaries = []
    for variant in page.variants:
        baseline = variant.baseline or page.baseline
        paired = None if baseline == variant.label else by_variant[baseline]
        summary = summarize(variant.label, by_variant[variant.label], paired)
        if both:
            running = summarize(variant.label, by_variant[variant.label], paired, RUNNING_AVERAGES)
            summary = replace(summary, running=running)
        summaries.append(summary)
    return adjust_for_multiplicity(summaries), missing


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

    Two pages that would write the same plot file are a :class:`PageError` before anything
    trains too. A run that fails (a plugin that raises, even :class:`KeyboardInterrupt`, or
    whose worker process dies) is reported in one line and counted; the others go on.

    Ctrl-C or SIGTERM raise :class:`KeyboardInterrupt` (SIGTERM:
    :class:`~normzoo.harness.interrupts.RunInterrupted` with its ``signal_number``) once the
    worker processes are stopped and the temporary folders removed; when compare has said what
    was stored, the exception is marked so
    (:func:`~normzoo.harness.interrupts.was_reported`). SIGKILL cannot be handled: the workers
    then exit by themselves, and the temporary folders (the runs' ``normzoo-compare-*``, a
    ``--smoke`` test's ``normzoo-smoke-*``) are removed by a process that outlives the
    comparison (:func:`~normzoo.compare.execute.scratch_folder`).
    """
    config.check()
    pages = [parse_page(path) for path in find_pages(list(paths))]
    if not pages:
        raise NormzooError(f"no page with a ```normzoo experiment block in {_listed(paths)}")
    shared = shared_plots(pages)  # refused now, not after the first page's runs trained
    if shared:
        raise PageError(shared[0])
    # a smoke test stores its results in a scratch folder, made where SIGTERM (and, after
    # SIGKILL, its remover) removes it; a real comparison makes none
    smoke = partial(scratch_folder, "normzoo-smoke-")
    with stops_interrupt(), (smoke if config.smoke else nullcontext)() as scratch:
        smoke_dir = Path(scratch) if scratch else None
        if config.smoke:  # one tuning seed, as one seed per variant
            pages = [_smoke_page(page) for page in pages]
        tuned = [page for page in pages if page.tune]
        trial_plans = {page.path: _plan_trials(page, smoke_dir) for page in tuned}
        plans = {page.path: _plan(page, smoke_dir) for page in pages if not page.tune}
        # first the tuning trials and the runs of the pages that do not tune, then the runs
        # that the tuned pages report, which their trials decide
        together = {**trial_plans, **plans}  # a page is in one of the two
        first = _unique(_seed_major(together[path] for path in sorted(together)), config.shard)
        if not config.smoke:  # a smoke test writes nothing beside the pages
            _check_writable(pages, first, tuned)
        failures = _run_round(first, config, say, "tuning trials and runs" if tuned else "")
        tunings: dict[Path, list[Tuning]] = {}
        for page in tuned:
            found, missing = _tunings(page, trial_plans[page.path])
            if found is None:
                say(f"{page.path}: {missing} tuning trials still missing; its reported runs "
                    "wait for them")  # fmt: skip
                continue
            tunings[page.path] = found
            plans[page.path] = _plan(_reported(page, found), smoke_dir)
        if tunings:
            second = _unique(_seed_major(plans[path] for path in sorted(tunings)), config.shard)
            failures += _run_round(second, config, say, "runs of the tuned pages' choices")
        for page in pages:
            if page.path not in plans:
                continue
            summaries, missing = _summaries(_reported(page, tunings.get(page.path)),
                                            plans[page.path])  # fmt: skip
            if missing:
                say(f"{page.path}: {missing} runs still missing; page not rewritten")
                continue
            section = _render(page, summaries, tunings.get(page.path))
            if config.smoke:
                say(f"{page.path}: smoke test passed ({_run_count(page, plans, trial_plans)} "
                    "runs)")  # fmt: skip
                continue
            render_plots(_reported(page, tunings.get(page.path)), summaries,
                         tunings.get(page.path))  # fmt: skip
            # the page is read again: text edited while the runs went on stays as edited
            fresh = parse_page(page.path)
            if (
                fresh.variants != page.variants
                or fresh.seeds != page.seeds
                or (fresh.tune != page.tune)
            ):
                say(f"{page.path}: its experiment changed while running; run again")
            elif fresh.with_generated(section) != fresh.text:
                # the page's file (through a symbolic link: the file it leads to, the link
                # kept), every character outside the section as it was, its line endings too
                mode = stat.S_IMODE(os.stat(fresh.path).st_mode)
                atomic_write_bytes(fresh.path, fresh.with_generated(section).encode("utf-8"))
                os.chmod(fresh.path, mode)  # a new file: the page's own permissions, not umask's
                say(f"{page.path}: results updated")
            else:
                say(f"{page.path}: up to date")
    return failures


def _smoke_page(page: Page) -> Page:
    """A tuned page as a smoke test runs it: the first tuning seed only."""
    if page.tune is None:
        return page
    return replace(page, tune=replace(page.tune, seeds=page.tune.seeds[:1]))


def _run_count(page: Page, plans: dict[Path, list[_PlannedRun]],
               trial_plans: dict[Path, list[_PlannedRun]]) -> int:  # fmt: skip
    return len(plans[page.path]) + len(trial_plans.get(page.path, []))


def _unique(runs: list[PendingRun], shard: tuple[int, int] | None) -> list[PendingRun]:
    """``runs`` with each (results folder, key) once, then the ``--shard`` slice of them."""
    unique: dict[tuple[Path, str], PendingRun] = {}
    for run in runs:
        unique.setdefault((run.results_dir, run.key), run)
    ordered = list(unique.values())
    if shard:
        i, k = shard
        ordered = ordered[i - 1 :: k]
    return ordered


def _check_writable(pages: list[Page], runs: list[PendingRun], tuned: list[Page]) -> None:
    """Checked now, not when the first result or plot is stored after training: every page
    is rewritten once its runs are stored, and a tuned page stores more runs later."""
    to_store = {run.results_dir for run in runs if not ResultStore(run.results_dir).has(run.key)}
    to_store |= {page.results_dir for page in tuned}
    for page in pages:
        check_writable(page, results=page.results_dir in to_store)
        if not os.access(page.path, os.W_OK):
            raise PageError(f"{page.path}: the page is not writable; make it writable or run "
                            "a copy")  # fmt: skip


def _run_round(
    ordered: list[PendingRun], config: CompareConfig, say: Callable[[str], None], what: str
) -> int:
    """Run those of ``ordered`` that are not stored yet; returns how many failed."""
    todo = [run for run in ordered if not ResultStore(run.results_dir).has(run.key)]
    jobs = max(1, min(config.jobs, len(todo)))
    # torch's thread count honours OMP_NUM_THREADS; the jobs share it
    threads = config.threads or max(1, torch.get_num_threads() // jobs)
    if config.executor == "ray":
        where = f"the running cluster (--address {config.address})" if config.address else \
            f"a local instance of {counted(jobs * threads, 'CPU')}"  # fmt: skip
        how = f"Ray tasks on {where}, {counted(threads, 'thread')} each"
    else:
        how = f"{counted(jobs, 'process', 'processes')}, {counted(threads, 'thread')} each"
    say(
        f"{what + ': ' if what else ''}{counted(len(ordered), 'run')}: "
        f"{len(ordered) - len(todo)} stored, {len(todo)} to run" + (f" ({how})" if todo else "")
    )
    return _run_with_progress(todo, jobs, threads, config, say)


def _render(page: Page, summaries: list[VariantSummary], tunings: list[Tuning] | None) -> str:
    """The generated section: a tuned page's tuning first, then the table of what it reports."""
    section = render_section(_reported(page, tunings), summaries)
    return section if tunings is None else render_tuning(page, tunings) + section


def _run_with_progress(
    todo: list[PendingRun], jobs: int, threads: int, config: CompareConfig,
    say: Callable[[str], None],
) -> int:  # fmt: skip
    from tqdm import tqdm

    failures = stored = 0  # counted here: a disabled bar counts nothing
    bar = tqdm(total=len(todo), unit="run", disable=not config.progress or not todo,
               file=sys.stderr)  # fmt: skip

    def done(run: PendingRun, result: dict[str, Any] | None, error: BaseException | None) -> None:
        nonlocal failures, stored
        if error is not None:
            failures += 1
            bar.write(f"failed: {run.label} seed {run.config.seed}: {error}")
        else:
            stored += 1
            test = result["epochs"][-1]["test_acc"] if result["epochs"] else float("nan")
            label = accuracy_label(run.config.evaluated_on)
            bar.set_postfix_str(f"{run.label} seed {run.config.seed}: {result['status']}, "
                                f"{label} {test:.3f}")  # fmt: skip
        bar.update(1)

    try:
        if config.executor == "ray":
            from normzoo.compare.ray_executor import run_on_ray

            run_on_ray(todo, jobs, threads, done, config.address)
        else:
            run_all(todo, jobs, threads, done)
    except NormzooError:  # Ray could not start or be joined: the line after the bar, alone
        bar.close()
        raise
    except KeyboardInterrupt as error:
        bar.close()
        say(f"interrupted: {stored} of {len(todo)} runs finished and stored; run the same "
            "command again to resume")  # fmt: skip
        mark_reported(error)  # the command line says nothing more
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
    plot or has a plot that does not record this page as the one it was drawn for, which of
    the page's plots it is, or the digest of the results it must be drawn from
    (:func:`~normzoo.compare.render.plot_problem`), shares a plot file with another of the
    pages, or whose generated section differs from what its stored results give (the first
    differing line, in the page's line endings); also a ``normzoo bench`` section that differs
    from its stored measurement (:func:`normzoo.bench.page.check`).
    """
    from normzoo.compare.render import plot_digests

    problems = bench_page.check(list(paths))
    pages = find_pages(list(paths))
    if not pages and not bench_page.find_pages(list(paths)):
        problems.append(f"no page with a ```normzoo experiment block in {_listed(paths)}")
    parsed = []
    for path in pages:
        try:
            page = parse_page(path)
            parsed.append((page, _plan_trials(page) if page.tune else _plan(page)))
        except PageError as error:
            problems.append(str(error))
    problems += shared_plots([page for page, _ in parsed])
    plotted = [path.resolve() for page, _ in parsed for path in figure_paths(page).values()]
    for page, planned in parsed:
        try:
            tunings = None
            if page.tune:
                tunings, missing = _tunings(page, planned)
                if tunings is None:
                    problems.append(f"{page.where()}: {missing} of {len(planned)} tuning trials "
                                    f"are not stored; run normzoo compare {page.path}")  # fmt: skip
                    continue
                planned = _plan(_reported(page, tunings))
            summaries, missing = _summaries(_reported(page, tunings), planned)
        except NormzooError as error:
            problems.append(f"{page.where()}: {error}")
            continue
        if missing:
            problems.append(f"{page.where()}: {missing} of {len(planned)} runs are not stored; "
                            f"run normzoo compare {page.path}")  # fmt: skip
            continue
        expected = _render(page, summaries, tunings).split("\n")
        found = page.generated.split(page.newline)
        for offset, (want, have) in enumerate(zip_longest(expected, found)):
            if want != have:
                problems.append(
                    f"{page.where(page.generated_line + offset)}: generated section differs "
                    f"from the stored results: expected {want!r}, found {have!r}; run "
                    f"normzoo compare {page.path}"
                )
                break
        digests = plot_digests(page, summaries, tunings)
        for name, plot in figure_paths(page).items():
            if not plot.is_file():
                problems.append(f"{page.where()}: plot {plot} is missing; run normzoo compare "
                                f"{page.path}")  # fmt: skip
            elif plotted.count(plot.resolve()) == 1:  # a shared plot is reported above
                problem = plot_problem(page, plot, digests[name])
                problems += [problem] if problem else []
    return problems
