"""Running the missing runs of a comparison: in this process or in ``jobs`` worker processes,
each finished run stored the moment it finishes."""

from __future__ import annotations

import multiprocessing
import tempfile
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


def execute(run: PendingRun, threads: int) -> dict[str, Any]:
    """Train one run with ``threads`` torch threads and store its result; returns the result.

    The harness's run directory (weights, curves) goes to a temporary directory: the stored
    result holds the metrics of every epoch, the status, the wall time, the machine and a
    summary of the learned affine parameters.
    """
    torch.set_num_threads(threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normzoo-compare-") as runs_dir:
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
    }
    ResultStore(run.results_dir).save(run.key, result)
    return result


def run_all(
    runs: Sequence[PendingRun],
    jobs: int,
    threads: int,
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
) -> None:
    """Run ``runs`` (``jobs`` at a time, each with ``threads`` torch threads), calling
    ``on_done(run, result, error)`` as each ends. A run that raises is reported and the others
    go on; Ctrl-C stops the workers, and every run already stored stays stored."""
    if jobs <= 1:
        for run in runs:
            try:
                result = execute(run, threads)
            except Exception as error:  # a failing run must not stop the others
                on_done(run, None, error)
            else:
                on_done(run, result, None)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    pool = ProcessPoolExecutor(jobs, context, use_threads, (threads,))
    waiting: dict[Future, PendingRun] = {}
    queue = list(runs)
    try:
        with stops_interrupt():
            while queue or waiting:
                while queue and len(waiting) < jobs:
                    run = queue.pop(0)
                    waiting[pool.submit(execute, run, threads)] = run
                done, _ = wait(waiting, return_when=FIRST_COMPLETED)
                for future in done:
                    run = waiting.pop(future)
                    error = future.exception()
                    on_done(run, None if error else future.result(), error)
    except KeyboardInterrupt:
        # the workers' runs in progress are lost; the stored ones stay
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
