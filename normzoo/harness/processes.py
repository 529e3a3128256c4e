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
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from normzoo.errors import NormzooError

#: Seconds a collective waits for the other processes before the run fails
#: (``NORMZOO_DIST_TIMEOUT`` overrides).
TIMEOUT = 120


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, config: Any, nproc: int, port: int, threads: int, note: str, progress: bool
) -> None:
    from normzoo.harness.experiment import run_experiment

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads),
        NORMZOO_RUN_DIRECTORY_NOTE=note,
    )  # fmt: skip
    torch.set_num_threads(threads)

    def report(metrics: Any) -> None:
        if rank == 0:
            print(metrics.summary(), flush=True)

    run_experiment(config, progress=progress and rank == 0, on_epoch=report)


def launch(config: Any, progress: bool) -> Path:
    """Run ``config`` on ``config.nproc`` local processes; returns the run directory.

    The processes split the machine's cores evenly (``torch.set_num_threads``): with their
    default thread counts they would slow each other down many times over. When a process
    exits with an error, the others are stopped, the run directory (if one was made) records
    ``failed`` with the process named, and :class:`ProcessFailed` is raised.
    """
    import torch.multiprocessing as mp

    from normzoo.harness.runs import RunDirectory

    threads = max(1, (os.cpu_count() or 1) // config.nproc)
    with tempfile.TemporaryDirectory(prefix="normzoo-nproc-") as scratch:
        note = str(Path(scratch) / "run-directory")
        try:
            mp.spawn(
                _worker, args=(config, config.nproc, _free_port(), threads, note, progress),
                nprocs=config.nproc, join=True,
            )  # fmt: skip
        except mp.ProcessRaisedException as error:
            lines = str(error).strip().splitlines()
            what = f"process {error.error_index} raised {lines[-1] if lines else 'an error'}"
            raise ProcessFailed(_describe_failure(note, what)) from None
        except mp.ProcessExitedException as error:
            raise ProcessFailed(
                _describe_failure(note, f"process {error.error_index} died ({error})")
            ) from None
        path = Path(Path(note).read_text())
    RunDirectory(path)  # exists: rank 0 finished it
    return path


def _describe_failure(note: str, what: str) -> str:
    """``what`` happened; the run directory (named in ``note`` by rank 0) records it."""
    from normzoo.harness.runs import METRICS, atomic_write_json

    message = f"multi-process run failed: {what}"
    if os.path.exists(note):
        directory = Path(Path(note).read_text())
        metrics_path = directory / METRICS
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        metrics.update(status="failed", message=message)
        metrics.setdefault("epochs", [])
        atomic_write_json(metrics_path, metrics)
        message += f"; run directory {directory} (status failed)"
    return message
