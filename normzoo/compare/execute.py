"""Running the missing runs of a comparison: in this process or in ``jobs`` worker processes,
each finished run stored the moment it finishes.

The run directories (weights, curves) of the runs go to one temporary folder per
:func:`run_all` (``normzoo-compare-*``, a :func:`scratch_folder`), removed when it returns,
fails or is stopped by Ctrl-C or SIGTERM. SIGKILL cannot be handled, so the folder is also
watched from outside: a small remover process, in a session of its own (a ``timeout -s KILL``
or a CI step that kills the comparison's whole process group does not reach it), removes the
folder once the comparison and every worker are gone. Worker processes die with the process
that started them: each watches its parent and exits once it is gone, so no worker trains on
as an orphan holding the caller's output open. Nothing is left behind unless the remover is
killed too (SIGKILL to every process of the session, or the machine going down).

A run fails alone: an exception in it (a :class:`KeyboardInterrupt` that a plugin raises
included: :class:`RunFailed`, as ``normzoo run`` says it) is reported and the other runs go
on. A worker that dies (a norm that calls :func:`os._exit`, the kernel's out-of-memory
killer) fails the run it was running; the runs the other workers had in progress are run
again in a fresh pool, and no worker is left behind.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from normzoo.compare.cache import ResultStore, resolved_config
from normzoo.errors import describe
from normzoo.harness.config import RunConfig
from normzoo.harness.group import machine_description, use_threads
from normzoo.harness.interrupts import (
    RunInterrupted,
    raised_interruption_message,
    signal_number_of,
    stops_interrupt,
)
from normzoo.harness.launch import launch
from normzoo.harness.revision import code_revision
from normzoo.workloads.slots import norm_modules

#: The file in a :func:`scratch_folder` that every process using the folder holds a shared
#: lock on; the remover's exclusive lock waits for all of them to be gone.
HOLDERS = ".holders"

# The remover: run by a bare Python (-I -S: no site, no PYTHON* variables, no normzoo), so it
# starts in milliseconds; argv[1] is the folder.
_REMOVER = """
import fcntl, os, shutil, sys
try:
    lock = os.open(os.path.join(sys.argv[1], ".holders"), os.O_RDWR)
except OSError:
    sys.exit()
fcntl.flock(lock, fcntl.LOCK_EX)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class RunFailed(Exception):
    """A run that failed in a way its message says in one line: a :class:`KeyboardInterrupt`
    that code (a plugin) raised, an error that cannot be sent from a worker, a worker that
    died."""


@contextmanager
def scratch_folder(prefix: str) -> Iterator[str]:
    """A new temporary folder (named ``prefix*``) for the block, removed when it ends, and
    removed even when this process is killed by SIGKILL: a remover process outside this
    process's session waits until no process holds the folder (this one, and those that called
    :func:`hold_scratch`), then removes it."""
    folder = tempfile.mkdtemp(prefix=prefix)
    lock = remover = None
    try:
        lock = os.open(os.path.join(folder, HOLDERS), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_SH)
        remover = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _REMOVER, folder],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a kill of this process group does not reach it
        )  # fmt: skip
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            os.close(lock)  # the remover, if still waiting, finds nothing left and ends
        if remover is not None:
            try:
                remover.wait(5)
            except subprocess.TimeoutExpired:  # a holder still alive: it removes it later
                pass


def hold_scratch(folder: str) -> int | None:
    """Hold ``folder`` (a :func:`scratch_folder`) for this process's lifetime: its remover
    waits for this process too. ``None`` when the folder is gone already."""
    try:
        lock = os.open(os.path.join(folder, HOLDERS), os.O_RDWR)
    except OSError:
        return None
    fcntl.flock(lock, fcntl.LOCK_SH)
    return lock


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
    """Train one run with ``threads`` torch threads and store its result (:func:`result_of`);
    returns the result."""
    result = result_of(run, threads, scratch)
    ResultStore(run.results_dir).save(run.key, result)
    return result


def result_of(run: PendingRun, threads: int, scratch: Path | str | None = None) -> dict[str, Any]:
    """Train one run with ``threads`` torch threads; returns its result, stored nowhere.

    The harness's run directory (weights, curves) goes to a temporary directory (under
    ``scratch`` when given): the result holds the metrics of every epoch, the status, the wall
    time, the machine and a summary of the learned affine parameters. A
    :class:`KeyboardInterrupt` that code raised (a plugin; no signal sent it) is this run's
    failure, :class:`RunFailed` saying where it was raised; Ctrl-C and SIGTERM pass on as
    :class:`~normzoo.harness.interrupts.RunInterrupted`.
    """
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="normzoo-compare-", dir=scratch) as runs_dir:
            outcome = launch(replace(run.config, runs_dir=runs_dir), progress=False)
    except KeyboardInterrupt as error:
        if signal_number_of(error) is not None:  # Ctrl-C or SIGTERM: the comparison stops
            raise
        message = error.args[0] if isinstance(error, RunInterrupted) and error.args else ""
        raise RunFailed(message or raised_interruption_message(error)) from error
    return {
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


#: Seconds between a worker's looks at whether its parent is still alive.
PARENT_POLL = 0.2

#: A worker's lock on its scratch folder (:func:`hold_scratch`), held until it exits.
_held: int | None = None


def _start_worker(threads: int, parent: int, scratch: str) -> None:
    """A worker process's initializer: ``threads`` threads, a hold on ``scratch``, and a daemon
    thread that ends the worker when ``parent`` (the comparison's process) is gone.

    Ctrl-C reaches every process of the terminal's group; the comparison alone answers it, by
    stopping its workers, so a worker ignores SIGINT (SIGTERM still stops it).
    """
    global _held
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    use_threads(threads)
    _held = hold_scratch(scratch)
    if _held is None or os.getppid() != parent:  # the comparison is gone already
        os._exit(128 + signal.SIGKILL)
    watcher = threading.Thread(
        target=_exit_with_parent, args=(parent,), name="normzoo-parent-watch", daemon=True
    )
    watcher.start()


def _exit_with_parent(parent: int) -> None:
    """Return never: once ``parent`` has died (this process is handed to another parent, so
    :func:`os.getppid` changes), exit at once; the scratch folder's remover removes the folder
    once every worker has exited.

    A thread that polls rather than ``prctl(PR_SET_PDEATHSIG)``: that is Linux only, and fires
    when the parent *thread* that started the worker ends, not the parent process.
    """
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os._exit(128 + signal.SIGKILL)  # as if killed with the parent: a run cut off is lost


def _marker(scratch: str, pid: int) -> Path:
    """The file in which worker ``pid`` notes the run it is running."""
    return Path(scratch) / f"worker-{pid}"


def _execute_in_worker(index: int, run: PendingRun, threads: int, scratch: str) -> dict[str, Any]:
    """:func:`execute` in a worker, which notes the run it runs (``index``), for the parent to
    tell which run a worker that died was running.

    What it raises must reach the parent: an exception that cannot be pickled would break the
    whole pool, so it is sent as :class:`RunFailed` with its one-line description. A stop
    (SIGTERM, from the parent or from ``kill``) ends the worker with the run.
    """
    marker = _marker(scratch, os.getpid())
    marker.write_text(str(index))
    try:
        return execute(run, threads, scratch)
    except KeyboardInterrupt as error:  # execute passes only a signal's on
        os._exit(128 + (signal_number_of(error) or signal.SIGTERM))
    except BaseException as error:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            raise RunFailed(describe(error)) from None
        raise
    finally:
        marker.unlink(missing_ok=True)


def run_all(
    runs: Sequence[PendingRun],
    jobs: int,
    threads: int,
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
) -> None:
    """Run ``runs`` (``jobs`` at a time, each with ``threads`` torch threads), calling
    ``on_done(run, result, error)`` as each ends. A run that raises, or whose worker dies, is
    reported and the others go on; Ctrl-C or SIGTERM stops the workers
    (:class:`KeyboardInterrupt`), and every run already stored stays stored. The runs'
    temporary folder is removed in every case (see the module's docstring)."""
    if not runs:
        return
    with scratch_folder("normzoo-compare-") as scratch, stops_interrupt():
        if jobs <= 1:
            for run in runs:
                try:
                    result = execute(run, threads, scratch)
                except Exception as error:  # a failing run must not stop the others
                    on_done(run, None, error)
                else:
                    on_done(run, result, None)
        else:
            queue = list(enumerate(runs))
            while queue:  # a fresh pool after one whose worker died
                queue = _run_in_pool(queue, jobs, threads, on_done, scratch)


def _run_in_pool(
    queue: list[tuple[int, PendingRun]],
    jobs: int,
    threads: int,
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
    scratch: str,
) -> list[tuple[int, PendingRun]]:
    """Run ``queue`` ((index, run) pairs) in one pool of ``jobs`` workers; returns the runs
    still to run when a worker died (the pool is broken), else an empty list."""
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    pool = ProcessPoolExecutor(
        min(jobs, len(queue)), context, _start_worker, (threads, os.getpid(), scratch)
    )
    processes: dict[int, Any] = {}  # every worker the pool started, by pid
    waiting: dict[Future, tuple[int, PendingRun]] = {}
    queue = list(queue)
    broken = False
    try:
        while (queue or waiting) and not broken:
            while queue and len(waiting) < jobs:
                try:
                    future = pool.submit(_execute_in_worker, *queue[0], threads, scratch)
                except BrokenProcessPool:
                    broken = True
                    break
                waiting[future] = queue.pop(0)
                processes.update(getattr(pool, "_processes", None) or {})
            if not waiting:
                break
            done, _ = wait(waiting, return_when=FIRST_COMPLETED)
            for future in done:
                if isinstance(future.exception(), BrokenProcessPool):
                    broken = True
                    continue
                _, run = waiting.pop(future)
                error = future.exception()
                on_done(run, None if error else future.result(), error)
        if broken:
            return _after_a_worker_died(pool, processes, waiting, queue, on_done, scratch)
    except BaseException:
        # the workers' runs in progress are lost; the stored ones stay
        _stop(pool, processes)
        raise
    pool.shutdown()
    return []


def _after_a_worker_died(
    pool: ProcessPoolExecutor,
    processes: dict[int, Any],
    waiting: dict[Future, tuple[int, PendingRun]],
    queue: list[tuple[int, PendingRun]],
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
    scratch: str,
) -> list[tuple[int, PendingRun]]:
    """The pool is broken: a worker died, and every run in progress got
    :class:`BrokenProcessPool`. The run that the dead worker was running fails; the others in
    progress run again (first). When no dead worker's run is known, all of them fail: every
    pool fails at least one run, so the comparison ends. Returns the runs still to run."""
    wait(waiting, timeout=30)  # the pool fails every waiting run at once
    # who died by itself: not of the SIGTERM with which the pool stops the others, nor alive
    stopped = (None, -signal.SIGTERM, 128 + signal.SIGTERM)
    ended = {pid: _exit_code(process) for pid, process in processes.items()}
    died = {pid: code for pid, code in ended.items() if code not in stopped}
    culprits: dict[int, int] = {}  # run index: exit code of the worker that was running it
    for pid, code in died.items():
        try:
            culprits[int(_marker(scratch, pid).read_text())] = code
        except (OSError, ValueError):
            continue
    _stop(pool, processes)
    for pid in processes:
        _marker(scratch, pid).unlink(missing_ok=True)
    again = []
    for future, (index, run) in waiting.items():
        error = future.exception() if future.done() else None
        if future.done() and not isinstance(error, BrokenProcessPool):  # ended before
            on_done(run, None if error else future.result(), error)
        elif index in culprits:
            how = _death(culprits[index])
            on_done(run, None, RunFailed(f"its worker process died ({how}); nothing of the run "
                                         "was stored"))  # fmt: skip
        elif culprits:
            again.append((index, run))
        else:
            how = ", ".join(sorted({_death(code) for code in died.values()})) or "ended abruptly"
            on_done(run, None, RunFailed(f"a worker process died ({how}) while the run was "
                                         "in progress; nothing of the run was stored"))  # fmt: skip
    return again + queue


def _exit_code(process: Any) -> int | None:
    """The exit code of ``process``, ``None`` while it runs. The pool's own thread may be
    reaping a process that has ended (its exit code then shows a moment later)."""
    deadline = time.monotonic() + 5
    while process.exitcode is None and time.monotonic() < deadline:
        if not multiprocessing.connection.wait([process.sentinel], timeout=0):
            return None  # still running
        time.sleep(0.01)
    return process.exitcode


def _death(exitcode: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _stop(pool: ProcessPoolExecutor, processes: dict[int, Any]) -> None:
    """Kill every worker of ``pool``, wait for them (and the pool's thread) to be gone, and
    shut the pool down without waiting for anything else."""
    processes = {**processes, **(getattr(pool, "_processes", None) or {})}
    for process in processes.values():
        if process.exitcode is None:
            process.kill()
    for process in processes.values():  # gone before their folder is removed
        process.join(5)
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    if manager is not None:
        manager.join(5)
