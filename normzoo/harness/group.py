"""The process group a run trains in: its processes, their shares of a batch, sums over them,
their devices and thread budget, and a description of the machine.

One process alone is a group of one (:func:`current` outside ``torch.distributed``), so the
training loop is written once for both. ``torchrun`` sets the environment this module reads
(:func:`join_from_environment`); ``normzoo run --nproc`` starts the processes itself
(:mod:`normzoo.harness.launch`) and joins each to the group it creates.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from normzoo.errors import NormzooError

#: What ``--device`` accepts, in the words of its error messages.
DEVICES = "auto, cpu, cuda or cuda:N"
#: Seconds a collective waits for the other processes before the run fails
#: (``NORMZOO_DIST_TIMEOUT`` overrides).
TIMEOUT = 120
#: Memory one worker of a ``--nproc`` run takes, in bytes: the peak resident size of a LeNet
#: worker on a CPU (the torch and Python runtime, the whole Fashion-MNIST training set as
#: float32 tensors, the model and its gradients), with a margin; docs/performance.md has the
#: measurement. The launcher, already running, is not counted: it refuses more workers than
#: fit in the memory available when they start.
PROCESS_MEMORY = 5 << 28


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
    """How long a collective waits for the other processes."""
    return datetime.timedelta(seconds=environment_seconds("NORMZOO_DIST_TIMEOUT", TIMEOUT))


def environment_seconds(variable: str, default: float) -> float:
    """A time limit in seconds from the environment ``variable``, else ``default``; a value
    that is not a finite number above 0 is one :class:`NormzooError` naming it."""
    text = os.environ.get(variable)
    if text is None:
        return float(default)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise NormzooError(
            f"{variable}={text!r} must be a number of seconds above 0; unset it for the default "
            f"{default:g} s"
        )
    return seconds


def backend(device: torch.device) -> str:
    """gloo on a CPU, NCCL on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def started_by_torchrun() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_from_environment(device: torch.device) -> bool:
    """Initialise the process group from torchrun's environment (``WORLD_SIZE`` > 1); returns
    whether this call initialised it (the caller then destroys it)."""
    if not started_by_torchrun() or dist.is_initialized():
        return False
    dist.init_process_group(backend(device), init_method="env://", timeout=timeout())
    return True


def local_device(device: torch.device, local_rank: int | None = None) -> torch.device:
    """On CUDA, each process of a host uses its own GPU (``local_rank``, else torchrun's
    ``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None:
        rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", rank)
    return device


def use_threads(threads: int) -> None:
    """Give this process ``threads`` threads: torch's, and OpenMP's for what it starts.

    Several torch processes on a few cores, each with the default thread count, slow each
    other down many times over; every launcher of processes calls this in each one.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "numba" not in sys.modules:  # a plugin's numba sizes its pool once, at its import
        os.environ["NUMBA_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def available_memory() -> int | None:
    """Bytes of memory available to new processes without swapping: ``MemAvailable`` of
    ``/proc/meminfo`` on Linux, else the free physical pages (``os.sysconf``); ``None`` where
    neither can be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                value, unit = line.split(":", 1)[1].split()
                return int(value) * (1024 if unit.lower() == "kb" else 1)
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def machine_description() -> str:
    """The CPU model (or the GPU's name for a CUDA run) and the core count, for the pages."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU; anything else must be a usable device.

    Only CPU and CUDA are supported: torch also parses ``mps``, ``meta`` and others, but the
    harness has not been made to work on them (``meta`` tensors hold no data at all), so they
    are refused here rather than failing somewhere inside training.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise NormzooError(f"unknown device {name!r}; use {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise NormzooError(f"device {name!r} is not supported; normzoo runs on {DEVICES} only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NormzooError(
                f"device {name!r} requested but CUDA is not available; use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise NormzooError(
                f"device {name!r} requested but there {'is' if count == 1 else 'are'} only "
                f"{count} CUDA device{'' if count == 1 else 's'}; use cuda:0 to cuda:{count - 1}"
            )
    return device
