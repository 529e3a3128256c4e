"""Training on several processes: each trains on its share of every global batch.

``normzoo run --nproc N`` starts the N processes itself (:func:`launch`); the same run started
by ``torchrun --nproc-per-node N -m normzoo run ...`` finds its process group in the
environment (:func:`join_from_environment`). Either way the backend is gloo on a CPU and NCCL
on CUDA, the model is wrapped in ``DistributedDataParallel``, the norms compute their
statistics over the global batch (their ``sync`` option), rank 0 alone tests, shows the
progress bar and writes the run directory, and every collective has a timeout, so a process
that dies ends the run with an error rather than a hang.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from normzoo.errors import NormzooError

#: Seconds a collective waits for the other processes before the run fails
#: (``NORMZOO_DIST_TIMEOUT`` overrides).
TIMEOUT = 120
#: Seconds the processes of a stopped run get to record it before they are killed.
STOP_GRACE = 30


class ProcessFailed(NormzooError):
    """One of the processes of a multi-process run died or failed; the message names it."""


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run (``world == 1``: alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, index: torch.Tensor) -> torch.Tensor:
        """This process's part of a global batch's indices (contiguous, sizes differ by at
        most one)."""
        if self.world == 1:
            return index
        return torch.tensor_split(index, self.world)[self.rank]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (SUM: gloo's AVG is unreliable)."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def from_main(self, value: float) -> float:
        """Rank 0's ``value``, on every process."""
        if self.world == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def current() -> Processes:
    """The processes of the initialised process group, or one process alone."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size())
    return Processes()


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("NORMZOO_DIST_TIMEOUT", TIMEOUT)))


def join_from_environment(device: torch.device) -> bool:
    """Initialise the process group from torchrun's environment (``WORLD_SIZE`` > 1); returns
    whether this call initialised it (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timeout())
    return True


def local_device(device: torch.device) -> torch.device:
    """On CUDA, each process of a host uses its own GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def use_threads(threads: int) -> None:
    """Give this process ``threads`` threads: torch's, OpenMP's, and numba's pool (``pit``'s
    loops), which numba sizes from the environment once, when it is first imported."""
    os.environ.update(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, config: Any, nproc: int, port: int, threads: int, note: str, progress: bool
) -> None:
    from normzoo.harness.experiment import run_experiment

    # Ctrl-C reaches every process of the terminal's group; the launcher alone answers it,
    # by stopping each process once with SIGTERM (see `_stops_forwarded`).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), NORMZOO_RUN_DIRECTORY_NOTE=note,
    )  # fmt: skip
    use_threads(threads)

    def report(metrics: Any) -> None:
        if rank == 0:
            print(metrics.summary(), flush=True)

    run_experiment(config, progress=progress and rank == 0, on_epoch=report)


def launch(config: Any, progress: bool) -> Path:
    """Run ``config`` on ``config.nproc`` local processes; returns the run directory.

    The processes split the machine's cores evenly (``torch.set_num_threads``): with their
    default thread counts they would slow each other down many times over. When a process
    exits with an error, the others are stopped, the run directory (if one was made) records
    ``failed`` with the process named, and :class:`ProcessFailed` is raised. Ctrl-C or SIGTERM
    to this process stops every process (SIGTERM, then SIGKILL on a second signal or after
    :data:`STOP_GRACE` seconds); the run directory records ``interrupted`` and
    :class:`~normzoo.harness.experiment.RunInterrupted` is raised.
    """
    import torch.multiprocessing as mp

    from normzoo.harness.runs import RunDirectory

    cores = os.cpu_count() or 1
    if config.nproc > cores:
        warnings.warn(
            f"--nproc {config.nproc} on {cores} cores: the processes take turns on the cores, "
            f"one thread each, which is slower than --nproc {cores}, not faster",
            RuntimeWarning, stacklevel=2,
        )  # fmt: skip
    threads = max(1, cores // config.nproc)
    with tempfile.TemporaryDirectory(prefix="normzoo-nproc-") as scratch:
        note = str(Path(scratch) / "run-directory")
        context = mp.spawn(
            _worker, args=(config, config.nproc, _free_port(), threads, note, progress),
            nprocs=config.nproc, join=False,
        )  # fmt: skip
        failure = None
        with _stops_forwarded(context.processes) as stops:
            try:
                while not context.join(timeout=1):
                    stops.kill_after_grace()
            except mp.ProcessRaisedException as error:
                lines = str(error).strip().splitlines()
                failure = f"process {error.error_index} raised {lines[-1] if lines else 'an error'}"
            except mp.ProcessExitedException as error:
                failure = f"process {error.error_index} died ({error})"
        if stops.received:
            raise _record_interruption(note, stops.received[0])
        if failure is not None:
            raise ProcessFailed(_describe_failure(note, failure))
        path = Path(Path(note).read_text())
    RunDirectory(path)  # exists: rank 0 finished it
    return path


class _Stops:
    """The signals the launcher received, and what it did to its processes about them."""

    def __init__(self, processes: list[Any]) -> None:
        self.processes = processes
        self.received: list[int] = []
        self.first_at: float | None = None

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
def _stops_forwarded(processes: list[Any]) -> Iterator[_Stops]:
    """While the processes run, Ctrl-C or SIGTERM to the launcher stops them all.

    Without this, SIGTERM killed the launcher alone and its processes trained on as orphans,
    and finished a run the user had stopped. Signal handlers can only be set in the main
    thread; elsewhere the processes are left to the caller.
    """
    stops = _Stops(processes)
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, stops.handle) for number in numbers}
    try:
        yield stops
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _record_end(note: str, status: str, message: Callable[[int], str]) -> tuple[Path | None, str]:
    """Record how the run ended in its directory (named in ``note`` by rank 0, if it made one),
    whatever its processes managed to write before they ended: ``status`` and the message for
    its number of finished epochs. Returns the directory (``None``: none was made) and the
    message."""
    from normzoo.harness.runs import METRICS, atomic_write_json

    if not os.path.exists(note):
        return None, message(0)
    directory = Path(Path(note).read_text())
    metrics_path = directory / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics.setdefault("epochs", [])
    text = message(len(metrics["epochs"]))
    metrics.update(status=status, message=text)
    atomic_write_json(metrics_path, metrics)
    return directory, text


def _record_interruption(note: str, number: int) -> BaseException:
    """The run was stopped by signal ``number``: its directory records ``interrupted``."""
    from normzoo.harness.experiment import RunInterrupted, interruption_message

    directory, message = _record_end(
        note, "interrupted", lambda epochs: interruption_message(number, epochs)
    )
    return RunInterrupted(message, number, directory)


def _describe_failure(note: str, what: str) -> str:
    """``what`` happened; the run directory (if one was made) records it."""
    directory, message = _record_end(note, "failed", lambda _: f"multi-process run failed: {what}")
    if directory is not None:
        message += f"; run directory {directory} (status failed)"
    return message
