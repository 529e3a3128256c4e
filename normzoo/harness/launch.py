"""Starting a run: in this process, in the processes torchrun started, or on ``--nproc``
local processes; the top of the harness, which the command line and ``normzoo compare`` call.

Whatever the number of processes, the launcher checks everything once (settings, device, data,
a trial batch), creates the one run directory, passes it down as an argument, and records how
the run ended through :class:`~normzoo.harness.runs.RunDirectory`. On several processes the
backend is gloo on a CPU and NCCL on CUDA, the model is wrapped in ``DistributedDataParallel``,
the norms compute their statistics over the global batch (their ``sync`` option), rank 0
alone tests, shows the progress bar and writes the run directory, and every collective has a
timeout, so a process that dies ends the run with an error rather than a hang.

    from normzoo.harness.config import RunConfig
    from normzoo.harness.launch import launch
    result = launch(RunConfig(norm="layernorm", epochs=2))
    result.epochs[-1].test_acc, result.directory.path
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from normzoo import registry
from normzoo.errors import NormzooError
from normzoo.harness import group
from normzoo.harness.config import RunConfig
from normzoo.harness.experiment import RunResult, load, prepare, run_experiment, run_title
from normzoo.harness.group import (
    backend,
    current,
    join_from_environment,
    local_device,
    resolve_device,
    started_by_torchrun,
    timeout,
    use_threads,
)
from normzoo.harness.interrupts import (
    RunInterrupted,
    interruption_message,
    raised_interruption_message,
    signals_handled,
    stops_interrupt,
)
from normzoo.harness.revision import code_revision
from normzoo.harness.runs import RunDirectory, RunFilesError
from normzoo.harness.train import EpochMetrics
from normzoo.workloads.slots import build_model

#: Seconds the processes of a stopped run get to record it before they are killed.
STOP_GRACE = 30


class ProcessFailed(NormzooError):
    """One of the processes of a multi-process run died or failed; the message names it."""


def launch(
    config: RunConfig,
    progress: bool = True,
    on_epoch: Callable[[EpochMetrics], None] = lambda metrics: None,
) -> RunResult:
    """Run ``config``: train, test after every epoch, and write config, metrics, weights and
    curves to a new run directory under ``config.runs_dir``; ``on_epoch`` gets each epoch's
    metrics as they come (in this process, whichever process trained).

    Bad input is one :class:`~normzoo.errors.NormzooError` before any directory or process
    exists. Ctrl-C or SIGTERM raises
    :class:`~normzoo.harness.interrupts.RunInterrupted` after the run directory records
    ``interrupted``; a diverged run is returned with ``status == "diverged"``.
    """
    config.validate()
    if config.nproc > 1:
        if started_by_torchrun():
            raise NormzooError(
                f"--nproc {config.nproc} under torchrun: the processes come from torchrun; "
                "leave --nproc at 1"
            )
        return _on_processes(config, progress, on_epoch)
    with stops_interrupt():
        try:
            return _in_this_process(config, progress, on_epoch)
        except RunInterrupted:
            raise
        except KeyboardInterrupt as error:  # raised by code before the run directory existed
            raise RunInterrupted(raised_interruption_message(error), None) from error


def _in_this_process(
    config: RunConfig, progress: bool, on_epoch: Callable[[EpochMetrics], None]
) -> RunResult:
    """One process alone, or one of the processes torchrun started (rank 0 writes)."""
    device = resolve_device(config.device)
    joined = join_from_environment(device)
    try:
        processes = current()
        if config.compile and processes.world > 1:
            raise NormzooError(
                f"--compile runs in one process only, but this is one of {processes.world} "
                "(torchrun); drop --compile"
            )
        device = local_device(device)
        prepared = prepare(config, device, processes.world)
        directory = _new_directory(config, prepared.record) if processes.main else None
        return run_experiment(config, prepared.model, prepared.data, directory, progress, on_epoch)
    finally:
        if joined:
            dist.destroy_process_group()


def _new_directory(config: RunConfig, record: dict) -> RunDirectory:
    """The run's directory with its config and a ``running`` status, recording the code that
    makes the run. A file that cannot be written there (a full disk) leaves ``metrics.json``
    saying ``failed`` where it can still be written; the :class:`RunFilesError` raised carries
    the directory (and names every file that could not be written)."""
    directory = RunDirectory.create(config.runs_dir, config.norm, code_revision())
    try:
        directory.write_config(record)
        directory.record("running", [])
    except RunFilesError as error:
        raise directory.record_failed_write(error, title=run_title(config)) from error.__cause__
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _on_processes(
    config: RunConfig, progress: bool, on_epoch: Callable[[EpochMetrics], None]
) -> RunResult:
    """Run ``config`` on ``config.nproc`` local processes.

    The processes split the machine's cores evenly: with their default thread counts they
    would slow each other down many times over. Rank 0 sends each epoch's metrics, and at the
    end its status and weights, through a queue. When a process exits with an error, the
    others are stopped, the run directory records ``failed`` with the process named, and
    :class:`ProcessFailed` is raised. Ctrl-C or SIGTERM to this process stops every process
    (SIGTERM, then SIGKILL on a second signal or after :data:`STOP_GRACE` seconds); the run
    directory records ``interrupted`` and :class:`RunInterrupted` is raised.
    """
    import torch.multiprocessing as mp

    _refuse_beyond_memory(config.nproc)
    cores = os.cpu_count() or 1
    if config.nproc > cores:
        warnings.warn(
            f"--nproc {config.nproc} on {cores} cores: the processes take turns on the cores, "
            f"one thread each, which is slower than --nproc {cores}, not faster",
            RuntimeWarning, stacklevel=3,
        )  # fmt: skip
    _refuse_in_process_plugins(config)
    threads = max(1, cores // config.nproc)
    device = resolve_device(config.device)
    prepared = prepare(config, local_device(device, 0), config.nproc)  # one trial, here
    directory = _new_directory(config, prepared.record)
    title = run_title(config)
    history: list[EpochMetrics] = []
    end: tuple[str, str, bytes, str] | None = None
    messages = mp.get_context("spawn").SimpleQueue()

    def receive() -> None:
        nonlocal end
        while not messages.empty():
            message = messages.get()
            if isinstance(message, EpochMetrics):
                history.append(message)
                on_epoch(message)
            else:
                end = message

    failure = None
    with _stops_forwarded() as stops:  # before the processes start: none may be orphaned
        context = mp.spawn(
            _worker,
            args=(config, _free_port(), threads, directory, progress, messages),
            nprocs=config.nproc, join=False,
        )  # fmt: skip
        stops.forward_to(context.processes)
        try:
            while not context.join(timeout=0.2):
                receive()
                stops.kill_after_grace()
        except mp.ProcessRaisedException as error:
            lines = str(error).strip().splitlines()
            failure = f"process {error.error_index} raised {lines[-1] if lines else 'an error'}"
        except mp.ProcessExitedException as error:
            failure = f"process {error.error_index} died ({error})"
        receive()
    if stops.received:
        message = interruption_message(stops.received[0], len(history))
        directory.record("interrupted", history, message, title)
        raise RunInterrupted(message, stops.received[0], directory.path)
    if failure is not None or end is None:
        message = f"multi-process run failed: {failure or 'rank 0 reported no end'}"
        directory.record("failed", history, message, title)
        raise ProcessFailed(f"{message}; run directory {directory.path} (status failed)")
    status, message, weights, warning = end
    model = build_model(config)
    model.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
    return RunResult(directory, history, status, model, message, warning)


def _refuse_beyond_memory(nproc: int) -> None:
    """Refuse more processes than the available memory holds, at
    :data:`~normzoo.harness.group.PROCESS_MEMORY` each: past it the machine swaps or the
    kernel kills processes in the middle of the run."""
    available = group.available_memory()
    if available is None or nproc * group.PROCESS_MEMORY <= available:
        return
    fits = max(1, available // group.PROCESS_MEMORY)
    gib = 1 << 30
    raise NormzooError(
        f"--nproc {nproc}: each process takes about {group.PROCESS_MEMORY / gib:.1f} GiB of "
        f"memory and this machine has {available / gib:.1f} GiB available, room for {fits}; "
        f"use --nproc {fits}{' or fewer' if fits > 1 else ''}"
    )


def _refuse_in_process_plugins(config: RunConfig) -> None:
    """The processes start afresh and load plugins from the entry points only: a norm or a
    workload registered in this process (``normzoo.register``) would be unknown to them, and
    the run would fail after its directory was made."""
    records = {record.name: record for record in registry.plugins()}
    for kind, plugin in (
        ("norm", registry.info(config.norm).plugin),
        ("workload", registry.workload(config.workload).plugin),
    ):
        if not records[plugin].distribution:
            raise NormzooError(
                f"--nproc {config.nproc}: {kind} {getattr(config, kind)!r} was registered in "
                "this process (normzoo.register), and the processes --nproc starts load plugins "
                "from the installed entry points only; install it as a plugin package, or use "
                "--nproc 1"
            )


def _worker(
    rank: int,
    config: RunConfig,
    port: int,
    threads: int,
    directory: RunDirectory,
    progress: bool,
    messages: Any,
) -> None:
    """One of the launcher's processes: join the group, train on this rank's shares, and (rank
    0) write the run directory and report to the launcher."""
    # Ctrl-C reaches every process of the terminal's group; the launcher alone answers it,
    # by stopping each process once with SIGTERM (see `_stops_forwarded`).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    use_threads(threads)
    device = local_device(resolve_device(config.device), rank)
    dist.init_process_group(
        backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=config.nproc, timeout=timeout(),
    )  # fmt: skip
    main = rank == 0
    try:
        with stops_interrupt():
            model, data = load(replace(config, download=False), device)  # the launcher did
            result = run_experiment(
                config, model, data, directory if main else None,
                progress and main, on_epoch=messages.put if main else lambda metrics: None,
            )  # fmt: skip
        if main:
            weights = io.BytesIO()
            torch.save(result.model.state_dict(), weights)
            messages.put((result.status, result.message, weights.getvalue(), result.warning))
    finally:
        dist.destroy_process_group()


class _Stops:
    """The signals the launcher received, and what it did to its processes about them."""

    def __init__(self) -> None:
        self.processes: list[Any] = []
        self.received: list[int] = []
        self.first_at: float | None = None

    def forward_to(self, processes: list[Any]) -> None:
        """Stop signals reach ``processes`` from now on; one that arrived while they were
        starting is passed on at once."""
        self.processes = processes
        if self.received:
            self._signal_all(signal.SIGTERM)

    def _signal_all(self, number: int) -> None:
        for process in self.processes:
            if process.is_alive():
                try:
                    os.kill(process.pid, number)
                except ProcessLookupError:
                    pass

    def handle(self, number: int, frame: object) -> None:
        self.received.append(number)
        if self.first_at is None:
            self.first_at = time.monotonic()
            self._signal_all(signal.SIGTERM)  # each records its state and exits
        else:
            self._signal_all(signal.SIGKILL)  # asked twice: stop now

    def kill_after_grace(self) -> None:
        """A process blocked in a collective cannot run its handler until the collective
        times out; past the grace period it is killed (the launcher records the run)."""
        if self.first_at is not None and time.monotonic() - self.first_at > STOP_GRACE:
            self._signal_all(signal.SIGKILL)


@contextmanager
def _stops_forwarded() -> Iterator[_Stops]:
    """While the processes run, Ctrl-C or SIGTERM to the launcher stops them all.

    Without this, SIGTERM killed the launcher alone and its processes trained on as orphans,
    and finished a run the user had stopped.
    """
    stops = _Stops()
    with signals_handled(stops.handle):
        yield stops
