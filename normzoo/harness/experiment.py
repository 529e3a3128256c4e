"""One run in one process: the checked model and data (:func:`prepare`), then training with
every epoch recorded in the run directory (:func:`run_experiment`).

The launcher (:mod:`normzoo.harness.launch`) calls both: it prepares once, creates the run
directory, and runs the experiment in its own process or in each of several; this module
knows nothing of how many processes there are beyond the process group it trains in.
"""

from __future__ import annotations

import inspect
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import normzoo
from normzoo.errors import NormzooError, describe
from normzoo.harness.config import RunConfig
from normzoo.harness.group import current
from normzoo.harness.interrupts import (
    RunInterrupted,
    interruption_message,
    raised_interruption_message,
    signal_number_of,
    stops_deferred,
)
from normzoo.harness.runs import (
    CONFIG,
    WEIGHTS,
    RunDirectory,
    RunFilesError,
    check_runs_root,
    json_bytes,
)
from normzoo.harness.train import EpochMetrics, TrainingDiverged, batch_bounds, probe_norms, train
from normzoo.workloads.data import Dataset, load_workload_data
from normzoo.workloads.slots import build_model


@dataclass
class RunResult:
    """Where the files went (``None`` in a process other than rank 0), what each epoch
    measured and the trained model; ``status`` is ``finished`` or ``diverged`` (a failed or
    interrupted run raises instead)."""

    directory: RunDirectory | None
    epochs: list[EpochMetrics]
    status: str
    model: nn.Module
    message: str = ""
    #: Said of a finished run whose result is not a normal one (see :func:`chance_warning`).
    warning: str = ""


#: A final test accuracy at most this far above 1 / classes is at chance level.
CHANCE_MARGIN = 0.02


def chance_warning(config: RunConfig, test_acc: float, classes: int) -> str:
    """A warning when ``test_acc`` is at (or below) chance level, ``1 / classes`` plus
    :data:`CHANCE_MARGIN`: the model learned nothing (usually too large a learning rate for
    the norm, or the norm's options), and the number should not read as a result; else ``""``.
    """
    chance = 1 / max(classes, 1)
    if classes < 2 or test_acc > chance + CHANCE_MARGIN:
        return ""
    return (
        f"test accuracy {test_acc:.3f} is at chance level for {classes} classes "
        f"(1/{classes} = {chance:.3f}): the model has not learned; try a smaller --lr (this run: "
        f"{config.lr:g}) or other options of norm {config.norm!r} (normzoo info {config.norm})"
    )


@dataclass
class Prepared:
    """A run's model and data on its device, and the record ``config.json`` holds."""

    model: nn.Module
    data: Dataset
    record: dict


def run_title(config: RunConfig) -> str:
    """The run's title in its curves: the workload and the norm."""
    return f"{config.workload} + {config.norm}"


def config_record(config: RunConfig, device: torch.device, data: Dataset, processes: int) -> dict:
    """What ``config.json`` holds: the settings, the resolved norm options, the versions."""
    workload = normzoo.workload(config.workload)
    return {
        "config": asdict(config),
        "resolved_norm_options": config.resolved_norm_options(),
        "workload_version": workload.version,
        "device": str(device),
        "processes": processes,
        "train_examples": len(data.train),
        f"{config.evaluated_on}_examples": len(data.test),
        "evaluated_on": config.evaluated_on,
        "versions": {
            "normzoo": normzoo.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def load(config: RunConfig, device: torch.device) -> tuple[nn.Module, Dataset]:
    """The run's model (initialised from ``config.seed``) and its data, both on ``device``."""
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    data = load_workload_data(config.workload, config.data_dir, config.download)
    if config.val_split:
        data = data.validation(config.val_split)
    return model, data.subset(config.train_subset, config.test_subset).to(device)


def restore(directory: Path | str, device: torch.device) -> tuple[RunConfig, nn.Module, Dataset]:
    """A run directory's configuration, its trained model (the weights in ``model.pt``) and its
    data, on ``device``."""
    directory = Path(directory).expanduser()
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise NormzooError(
                f"{directory} has no {name}: give a run directory that `normzoo run` wrote "
                "(its path is printed at the end of the run)"
            )
    try:
        record = json.loads((directory / CONFIG).read_text())
        config = RunConfig(**record["config"])
        model, data = load(config, device)
        model.load_state_dict(torch.load(directory / WEIGHTS, map_location=device))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise NormzooError(f"cannot restore the run in {directory}: {describe(error)}") from error
    return config, model, data


def prepare(config: RunConfig, device: torch.device, processes: int = 1) -> Prepared:
    """The model and the data on ``device``, after every check that can be made before a run
    directory exists: the runs directory, the model settings, the data, the batch size, and a
    trial batch through a copy of the model (:func:`~normzoo.harness.train.probe_norms`), so
    bad input costs no directory and starts no process."""
    check_runs_root(config.runs_dir)
    model, data = load(config, device)
    if len(data.test) == 0:  # the loader refuses empty files; this guards other sources
        raise NormzooError("the test set has 0 examples; accuracy would be meaningless")
    batch_bounds(len(data.train), config.batch_size)
    if processes > 1 and config.batch_size < processes:
        raise NormzooError(
            f"--batch-size {config.batch_size} cannot be shared by --nproc {processes} "
            "processes; use a batch at least as large as the number of processes"
        )
    probe_norms(model, data.train, config.batch_size, config.norm)
    record = config_record(config, device, data, processes)
    json_bytes(record)  # a non-finite option fails here, before the directory exists
    return Prepared(model, data, record)


#: DDP without broadcasting rank 0's buffers at every forward (torch >= 2.13 renamed the switch)
_NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def run_experiment(
    config: RunConfig,
    model: nn.Module,
    data: Dataset,
    directory: RunDirectory | None,
    progress: bool = True,
    on_epoch: Callable[[EpochMetrics], None] = lambda metrics: None,
) -> RunResult:
    """Train ``model`` on ``data`` with ``config`` in this process (one of the process group,
    if one is initialised), recording every epoch in ``directory`` (rank 0's; ``None`` in the
    other processes).

    ``metrics.json`` is rewritten after every epoch and always ends with a final status, never
    ``running``:

    - ``finished``: returned; weights and curves are saved.
    - ``diverged``: a loss or running statistic became non-finite; returned with the message.
    - ``interrupted``: Ctrl-C or SIGTERM, or a :class:`KeyboardInterrupt` that code raised
      (the message says which, and where it was raised);
      :class:`~normzoo.harness.interrupts.RunInterrupted` is raised, carrying the directory
      and the signal (``None`` for a raised one).
    - ``failed``: any other exception; recorded with its message, then re-raised.

    SIGINT and SIGTERM are held off while the final files and the final status are written,
    so a run is either finished completely or recorded as interrupted.
    """
    processes = current()
    trained: nn.Module = model
    if processes.world > 1:
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        # the norms keep their statistics equal across processes themselves (sync)
        trained = DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_BROADCAST)
    history: list[EpochMetrics] = []
    title = run_title(config)

    def record(status: str, message: str = "", warning: str = "") -> None:
        if directory is not None:
            directory.record(status, history, message, title, warning)

    def record_final(status: str, message: str) -> Exception | None:
        """The final status, written with interrupts held off; a failure to write it must
        not hide the error that ended the run (it is returned)."""
        with stops_deferred():
            try:
                record(status, message)
            except Exception as error:
                return error
        return None

    def epoch_done(metrics: EpochMetrics) -> None:
        history.append(metrics)
        record("running")
        on_epoch(metrics)

    try:
        train(
            trained, data, config.epochs, config.lr, config.batch_size, config.seed,
            label=config.norm, on_epoch=epoch_done, progress=progress and processes.main,
            precise_batches=config.precise_batches, compile=config.compile,
        )  # fmt: skip
        classes = int(max(data.train.labels.max(), data.test.labels.max())) + 1
        warning = chance_warning(config, history[-1].test_acc, classes) if history else ""
        with stops_deferred():
            if directory is not None:
                directory.save_weights(model)
            record("finished", warning=warning)
    except TrainingDiverged as error:
        record_final("diverged", str(error))
        return RunResult(directory, history, "diverged", model, str(error))
    except KeyboardInterrupt as error:
        number = signal_number_of(error)
        if number is None:  # raised by code (a plugin, a callback), not sent by a signal
            message = raised_interruption_message(error, len(history))
        else:
            message = interruption_message(number, len(history))
        record_final("interrupted", message)
        raise RunInterrupted(message, number, directory and directory.path) from error
    except BaseException as error:
        if isinstance(error, NormzooError):
            message = str(error)
        else:
            message = describe(error)
        unwritten = record_final("failed", message)
        if isinstance(error, RunFilesError) and directory is not None:
            # a full disk: say which files could not be written, metrics.json included
            error.directory = error.directory or directory.path
            if unwritten is not None:
                raise RunFilesError(f"{error}; then {unwritten}", directory.path) from error
        raise
    return RunResult(directory, history, "finished", model, warning=warning)
