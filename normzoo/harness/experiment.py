"""One run of the harness: load the data, build LeNet with a norm, train, save every file.

:func:`run_experiment` is what ``normzoo run`` calls; it is equally usable from Python::

    from normzoo.harness.experiment import RunConfig, run_experiment
    result = run_experiment(RunConfig(norm="layernorm", epochs=2))
    result.epochs[-1].test_acc, result.directory.path
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import normzoo
from normzoo.errors import NormzooError
from normzoo.harness.data import FashionMNIST, load_fashion_mnist
from normzoo.harness.model import build_lenet, first_line, frozen_affine_options
from normzoo.harness.processes import current, join_from_environment, launch, local_device
from normzoo.harness.runs import METRICS, WEIGHTS, RunDirectory, check_runs_root, json_bytes
from normzoo.harness.train import (
    EpochMetrics,
    TrainingDiverged,
    batch_bounds,
    probe_norms,
    resolve_device,
    train,
)

#: ``--seed`` must fit torch's generators (a signed 64-bit integer; ``seed + 1`` seeds a second).
MAX_SEED = 2**63 - 1


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a run.

    A :class:`KeyboardInterrupt`, so code that stops on Ctrl-C stops on it too. ``directory``
    is the run directory, whose ``metrics.json`` says ``interrupted`` (``None`` when the run
    was stopped before its directory existed); ``signal_number`` is the signal.
    """

    def __init__(self, message: str, signal_number: int, directory: Path | None = None) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.directory = directory


def interruption_message(signal_number: int, finished_epochs: int) -> str:
    """What ``metrics.json`` and the terminal say of a run that signal ``signal_number`` ended."""
    verb = "interrupted" if signal_number == signal.SIGINT else "terminated"
    return f"{verb} by {signal.Signals(signal_number).name} after {finished_epochs} finished epochs"


def _raise_interrupt(signal_number: int, frame: object) -> None:
    raise RunInterrupted(f"stopped by {signal.Signals(signal_number).name}", signal_number)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`RunInterrupted` for the block, as SIGINT already is.

    ``kill``, a batch scheduler or a container stop send SIGTERM, whose default action kills
    the process on the spot, leaving ``metrics.json`` at ``running`` forever. Signal handlers
    can only be set in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM off for the block; yields the list of those that arrived.

    While the final files or a final status are being written, an interrupt would leave them
    inconsistent with each other or with what the command line prints (``metrics.json`` says
    ``finished`` while the terminal says ``interrupted``). The block is short; a signal that
    arrives during it is recorded, and the caller decides what it means.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def defer(signal_number: int, frame: object) -> None:
        received.append(signal_number)

    previous = {number: signal.signal(number, defer) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; the defaults are the chapter's settings.

    One addition to the chapter's protocol: before each test, ``precise_stats`` training
    batches re-estimate the norms' running statistics with the epoch's final weights (see
    :func:`~normzoo.harness.train.reestimate_running_stats`). At lr 1.0 the running averages
    trail the weights so far that eval accuracy swings by several points from epoch to epoch
    (batch norm: 0.895 then 0.835), which would drown the differences between norms; 0
    restores the book's protocol exactly.
    """

    norm: str = "batchnorm"
    norm_options: dict[str, Any] = field(default_factory=dict)
    activation: str = "sigmoid"
    placement: str = "all"
    bias_before_norm: bool = True
    dropout: float = 0.0
    freeze_affine: bool = False
    epochs: int = 10
    lr: float = 1.0
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    precise_stats: int = 50
    runs_dir: str = "runs"
    nproc: int = 1
    compile: bool = False

    def validate(self) -> None:
        """Reject values no run could use, naming the bad one.

        Non-finite floats are rejected explicitly: ``nan`` fails every comparison, so a range
        check alone lets ``lr=nan`` through, and a NaN learning rate silently produces a NaN
        model (``inf`` one that diverges at the first step).
        """
        for name in ("lr", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NormzooError(f"{name} must be a finite number, got {value!r}")
        for name in ("epochs", "batch_size", "nproc"):
            if getattr(self, name) < 1:
                raise NormzooError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precise_stats < 0:
            raise NormzooError(f"precise_stats must be >= 0, got {self.precise_stats}")
        if not self.lr > 0:
            raise NormzooError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise NormzooError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise NormzooError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if self.compile and self.nproc > 1:
            raise NormzooError(
                f"--compile runs in one process only, got --nproc {self.nproc}; drop one of them"
            )
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise NormzooError(f"{name} must be >= 2, got {value}")


@dataclass
class RunResult:
    """Where the files went, what each epoch measured and the trained model; ``status`` is
    ``finished`` or ``diverged`` (a failed or interrupted run raises instead)."""

    directory: RunDirectory
    epochs: list[EpochMetrics]
    status: str
    model: torch.nn.Module
    message: str = ""


def run_experiment(
    config: RunConfig,
    progress: bool = True,
    on_epoch: Callable[[EpochMetrics], None] = lambda metrics: None,
) -> RunResult:
    """Train LeNet with ``config`` and write config, metrics, weights and curves to a new run
    directory under ``config.runs_dir``.

    Everything that can be checked is checked before the run directory is created: the
    settings, the device, the runs directory, the data, and a trial batch through a copy of
    the model (:func:`~normzoo.harness.train.probe_norms`), so bad input costs no directory.

    Once the directory exists, ``metrics.json`` is rewritten after every epoch and always
    ends with a final status, never ``running``:

    - ``finished``: returned; weights and curves are saved.
    - ``diverged``: a loss or running statistic became non-finite; returned with the message.
    - ``interrupted``: Ctrl-C or SIGTERM (turned into an exception for the whole call);
      :class:`RunInterrupted` is raised, carrying the directory.
    - ``failed``: any other exception; recorded with its message, then re-raised.

    SIGINT and SIGTERM are held off while the final files and the final status are written,
    so a run is either finished completely or recorded as interrupted.
    """
    if config.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet one of the processes
        config.validate()
        _prepare(config, resolve_device(config.device))  # bad input: one line, no processes
        return _launched(config, progress)
    with _sigterm_interrupts():
        try:
            return _run(config, progress, on_epoch)
        except RunInterrupted:
            raise
        except KeyboardInterrupt as error:
            raise RunInterrupted(str(error) or "interrupted", signal.SIGINT) from error


#: DDP without broadcasting rank 0's buffers at every forward (torch >= 2.13 renamed the switch)
_NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _launched(config: RunConfig, progress: bool) -> RunResult:
    """Run on ``config.nproc`` local processes and read the result back from the run files."""
    import json

    path = launch(config, progress)
    metrics = json.loads((path / METRICS).read_text())
    model = build_lenet(
        config.norm, config.norm_options, config.activation, config.placement,
        config.bias_before_norm, config.dropout, config.freeze_affine,
    )  # fmt: skip
    if (path / WEIGHTS).exists():
        model.load_state_dict(torch.load(path / WEIGHTS, weights_only=True))
    epochs = [EpochMetrics(**epoch) for epoch in metrics["epochs"]]
    return RunResult(RunDirectory(path), epochs, metrics["status"], model, metrics["message"])


def _config_record(config: RunConfig, device: torch.device, train: int, test: int) -> dict:
    info = normzoo.info(config.norm)
    options = dict(config.norm_options)
    if config.freeze_affine:
        options.update(frozen_affine_options(info, options))
    return {
        "config": asdict(config),
        "resolved_norm_options": info.resolve_options(options),
        "device": str(device),
        "processes": current().world,
        "train_examples": train,
        "test_examples": test,
        "versions": {
            "normzoo": normzoo.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def _prepare(config: RunConfig, device: torch.device) -> tuple[nn.Module, FashionMNIST, dict]:
    """The model, the data on the device and the config record, after every check that can
    be made before a run directory exists (the trial batch included)."""
    check_runs_root(config.runs_dir)
    torch.manual_seed(config.seed)
    model = build_lenet(
        config.norm, config.norm_options, config.activation, config.placement,
        config.bias_before_norm, config.dropout, config.freeze_affine,
    ).to(device)  # fmt: skip
    data = load_fashion_mnist(config.data_dir, config.download)
    data = data.subset(config.train_subset, config.test_subset).to(device)
    if len(data.test) == 0:  # the loader refuses empty files; this guards other sources
        raise NormzooError("the test set has 0 examples; accuracy would be meaningless")
    batch_bounds(len(data.train), config.batch_size)
    if config.nproc > 1 and config.batch_size < config.nproc:
        raise NormzooError(
            f"--batch-size {config.batch_size} cannot be shared by --nproc {config.nproc} "
            "processes; use a batch at least as large as the number of processes"
        )
    probe_norms(model, data.train, config.batch_size, config.norm)
    record_of_config = _config_record(config, device, len(data.train), len(data.test))
    json_bytes(record_of_config)  # a non-finite option fails here, before the directory exists
    return model, data, record_of_config


def _run(config: RunConfig, progress: bool, on_epoch: Callable[[EpochMetrics], None]) -> RunResult:
    config.validate()
    device = resolve_device(config.device)
    joined = join_from_environment(device)  # under torchrun
    try:
        return _run_in_group(config, local_device(device), progress, on_epoch)
    finally:
        if joined:
            dist.destroy_process_group()


def _run_in_group(
    config: RunConfig,
    device: torch.device,
    progress: bool,
    on_epoch: Callable[[EpochMetrics], None],
) -> RunResult:
    processes = current()
    progress = progress and processes.main
    if config.compile and processes.world > 1:
        raise NormzooError(
            f"--compile runs in one process only, but this is one of {processes.world} "
            "(torchrun); drop --compile"
        )
    model, data, record_of_config = _prepare(config, device)

    trained: nn.Module = model
    if processes.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # the norms keep their statistics equal across processes themselves (sync)
        trained = DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_BROADCAST)
    directory = RunDirectory.create(config.runs_dir, config.norm) if processes.main else None
    if directory is not None and os.environ.get("NORMZOO_RUN_DIRECTORY_NOTE"):
        Path(os.environ["NORMZOO_RUN_DIRECTORY_NOTE"]).write_text(str(directory.path))
    history: list[EpochMetrics] = []

    def record(status: str, message: str = "") -> None:
        if directory is None:  # another process than rank 0
            return
        directory.write_metrics(
            {"status": status, "message": message, "epochs": [m.as_dict() for m in history]}
        )
        if history:
            directory.plot_curves([m.as_dict() for m in history], f"LeNet + {config.norm}")

    def record_final(status: str, message: str) -> None:
        """The final status, written with interrupts held off; a failure to write it must
        not hide the error that ended the run."""
        with _signals_deferred():
            try:
                record(status, message)
            except Exception:
                pass

    def epoch_done(metrics: EpochMetrics) -> None:
        history.append(metrics)
        record("running")
        on_epoch(metrics)

    try:
        if directory is not None:
            directory.write_config(record_of_config)
        record("running")
        train(
            trained, data, config.epochs, config.lr, config.batch_size, config.seed,
            label=config.norm, on_epoch=epoch_done, progress=progress,
            precise_stats=config.precise_stats, compile=config.compile,
        )  # fmt: skip
        with _signals_deferred():
            if directory is not None:
                directory.save_weights(model)
            record("finished")
    except TrainingDiverged as error:
        record_final("diverged", str(error))
        return RunResult(directory, history, "diverged", model, str(error))
    except KeyboardInterrupt as error:
        number = getattr(error, "signal_number", signal.SIGINT)
        message = interruption_message(number, len(history))
        record_final("interrupted", message)
        raise RunInterrupted(message, number, directory and directory.path) from error
    except BaseException as error:
        if isinstance(error, NormzooError):
            message = str(error)
        else:
            message = f"{type(error).__name__}: {first_line(error)}".rstrip(": ")
        record_final("failed", message)
        raise
    return RunResult(directory, history, "finished", model)
