"""Running the missing runs of a comparison: in this process or in ``jobs`` worker processes,
each finished run stored the moment it finishes.

The run directories (weights, curves) of the runs go to one temporary folder per
:func:`run_all` (``normzoo-compare-*``), removed when it returns, fails or is stopped by
Ctrl-C or SIGTERM. Worker processes die with the process that started them, even when it was
killed by SIGKILL (which nothing can handle): each watches its parent and, once the parent is
gone, removes that folder and exits, so no worker trains on as an orphan holding the caller's
output open. What SIGKILL leaves behind: with ``jobs`` 1 (no workers to clean up), that
folder, and a ``--smoke`` comparison's ``normzoo-smoke-*`` folder.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from normzoo.compare.cache import ResultStore, resolved_config
from normzoo.harness.config import RunConfig
from normzoo.harness.group import machine_description, use_threads
from normzoo.harness.interrupts import stops_interrupt
from normzoo.harness.launch import launch
from normzoo.harness.revision import code_revision
from normzoo.workloads.slots import norm_modules


@dataclass(frozen=True)
class PendingRun:
    """A (variant, seed) whose result is not stored yet."""

    label: str
    config: RunConfig
    key: str
    results_dir: Path


def affine_summary(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each norm layer's gamma (``weight``) and beta (``bias``)."""
    summary: dict[str, dict[str, float]] = {}
    for name, module in norm_modules(model):
        entry: dict[str, float] = {}
        for parameter in ("weight", "bias"):
            value = getattr(module, parameter, None)
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                entry[f"{parameter}_mean"] = float(value.detach().float().mean())
                entry[f"{parameter}_std"] = float(value.detach().float().std())
        if entry:
            summary[name] = entry
    return summary


def execute(run: PendingRun, threads: int, scratch: Path | str | None = None) -> dict[str, Any]:
    """Train one run with ``threads`` torch threads and store its result; returns the result.

    The harness's run directory (weights, curves) goes to a temporary directory (under
    ``scratch`` when given): the stored result holds the metrics of every epoch, the status,
    the wall time, the machine and a summary of the learned affine parameters.
    """
    torch.set_num_threads(threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normzoo-compare-", dir=scratch) as runs_dir:
        outcome = launch(replace(run.config, runs_dir=runs_dir), progress=False)
    result = {
        "key": run.key,
        "label": run.label,
        "config": resolved_config(run.config),
        "status": outcome.status,
        "message": outcome.message,
        "epochs": [m.as_dict() for m in outcome.epochs],
        "affine": affine_summary(outcome.model),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_description(),
        "device": str(next(outcome.model.parameters()).device),
        "threads": threads,
        "torch": torch.__version__,
        "code": code_revision().as_dict(),
    }
    ResultStore(run.results_dir).save(run.key, result)
    return result


#: Seconds between a worker's looks at whether its parent is still alive.
PARENT_POLL = 0.2


def _start_worker(threads: int, parent: int, scratch: str) -> None:
    """A worker process's initializer: ``threads`` threads, and a daemon thread that ends the
    worker when ``parent`` (the comparison's process) is gone."""
    use_threads(threads)
    watcher = threading.Thread(
        target=_exit_with_parent, args=(parent, scratch), name="normzoo-parent-watch", daemon=True
    )
    watcher.start()


def _exit_with_parent(parent: int, scratch: str) -> None:
    """Return never: once ``parent`` has died (this process is handed to another parent, so
    :func:`os.getppid` changes), remove ``scratch`` and exit at once.

    A thread that polls rather than ``prctl(PR_SET_PDEATHSIG)``: that is Linux only, and fires
    when the parent *thread* that started the worker ends, not the parent process.
    """
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    shutil.rmtree(scratch, ignore_errors=True)
    os._exit(128 + 9)  # as if killed with the parent: no cleanup of a run that is cut off


def run_all(
    runs: Sequence[PendingRun],
    jobs: int,
    threads: int,
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
) -> None:
    """Run ``runs`` (``jobs`` at a time, each with ``threads`` torch threads), calling
    ``on_done(run, result, error)`` as each ends. A run that raises is reported and the others
    go on; Ctrl-C or SIGTERM stops the workers (:class:`KeyboardInterrupt`), and every run
    already stored stays stored. The runs' temporary folder is removed in every case but
    SIGKILL (see the module's docstring)."""
    if not runs:
        return
    scratch = tempfile.mkdtemp(prefix="normzoo-compare-")
    try:
        with stops_interrupt():
            if jobs <= 1:
                for run in runs:
                    try:
                        result = execute(run, threads, scratch)
                    except Exception as error:  # a failing run must not stop the others
                        on_done(run, None, error)
                    else:
                        on_done(run, result, None)
            else:
                _run_in_workers(runs, jobs, threads, on_done, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_in_workers(
    runs: Sequence[PendingRun],
    jobs: int,
    threads: int,
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
    scratch: str,
) -> None:
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    pool = ProcessPoolExecutor(jobs, context, _start_worker, (threads, os.getpid(), scratch))
    waiting: dict[Future, PendingRun] = {}
    queue = list(runs)
    try:
        while queue or waiting:
            while queue and len(waiting) < jobs:
                run = queue.pop(0)
                waiting[pool.submit(execute, run, threads, scratch)] = run
            done, _ = wait(waiting, return_when=FIRST_COMPLETED)
            for future in done:
                run = waiting.pop(future)
                error = future.exception()
                on_done(run, None if error else future.result(), error)
    except BaseException:
        # the workers' runs in progress are lost; the stored ones stay
        processes = list(getattr(pool, "_processes", {}).values())
        for process in processes:
            process.kill()
        for process in processes:  # gone before their folder is removed
            process.join(5)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
