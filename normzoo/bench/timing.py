"""What a norm costs, as a ratio to torch's batch norm measured in the same run.

Separate runs on a shared machine mislead (two runs of the same code differ by more than the
norms do), so every case times the candidate and the baseline (``torch-batchnorm`` in the same
slots; ``layernorm`` for a workload of ``seq`` slots only, see :func:`baseline_of`) in
alternating rounds, each round a :class:`torch.utils.benchmark.Timer` ``blocked_autorange``
after a warm-up, and reports the median of the per-round ratios. The thread count is fixed
and reported.

The cases come from a registered workload (``lenet`` by default), so the shapes timed are the
ones a run trains, not a restatement of them:

``WORKLOAD-train``
    one training step of the workload's model (forward, cross-entropy, backward, SGD step with
    lr 0.01) on a batch of its training data, the norm in every slot;
``WORKLOAD-eval``
    the eval-mode forward of the same model on the same batch;
``SLOT-train``, ``SLOT-eval`` for each norm slot, in the workload's order
    one norm layer alone at the slot's channels, layout and input size, forward and backward
    in train mode, or the eval forward.

For ``lenet``: ``lenet-train``, ``lenet-eval``, ``conv1-train``, ``conv1-eval``, ...,
``fc2-eval``. Train cases also count the bytes autograd saves for the backward of one call
(through ``torch.autograd.graph.saved_tensors_hooks``, on any device) and, on CUDA, the peak
memory.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normzoo import registry
from normzoo.errors import NormzooError, describe, suggest
from normzoo.harness.config import RunConfig
from normzoo.harness.group import machine_description, resolve_device
from normzoo.harness.runs import atomic_write_json
from normzoo.interface import Slot
from normzoo.workloads.slots import ModelSettings, build_model

# torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU machines
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

if TYPE_CHECKING:
    from normzoo.bench.pipelines import EndToEnd

BASELINE = "torch-batchnorm"
#: The baseline of a workload whose slots are all ``seq`` (a transformer's): layer norm, what
#: transformers use (``layernorm`` on ``seq`` normalizes each token over its channels, as
#: ``nn.LayerNorm(C)``), not batch statistics over tokens.
SEQ_BASELINE = "layernorm"
#: The workload measured when none is named; a results file records its workload only when it
#: is another one, so the files (and pages) measured before workloads existed stay as they are.
DEFAULT_WORKLOAD = ModelSettings.workload
#: Each case's second half: a training step (forward and backward) or an eval forward.
MODES = ("train", "eval")
#: A spread (interquartile range of the per-round ratios over their median) above this is
#: flagged: the machine was too busy for the ratio to be trusted to two digits.
NOISY_SPREAD = 0.10


def workload_cases(workload: str = DEFAULT_WORKLOAD) -> tuple[str, ...]:
    """Every case of ``workload``, in the order they are measured and shown: the whole model's
    train and eval, then each slot's."""
    return tuple(_case_table(workload))


def _case_table(workload: str) -> dict[str, tuple[Slot | None, str]]:
    """Each case of ``workload``: the slot it times alone (``None``: the whole model) and the
    mode. An unknown workload is :class:`NormzooError` naming the registered ones."""
    info = registry.workload(workload)
    table: dict[str, tuple[Slot | None, str]] = {
        f"{info.name}-{mode}": (None, mode) for mode in MODES
    }
    for slot in info.slots:
        table.update({f"{slot.name}-{mode}": (slot, mode) for mode in MODES})
    return table


def baseline_of(workload: str) -> str:
    """The norm every case of ``workload`` is timed against: :data:`SEQ_BASELINE` where all
    its slots are ``seq``, else :data:`BASELINE` (torch's batch norm)."""
    return SEQ_BASELINE if registry.workload(workload).layouts == ("seq",) else BASELINE


@dataclass(frozen=True)
class Measurement:
    """One case of one norm: median seconds per call of the norm and of the baseline measured
    in the same rounds, the median ratio and its relative spread."""

    norm: str
    case: str
    seconds: float
    baseline_seconds: float
    ratio: float
    spread: float
    rounds: int
    saved_bytes: int | None = None
    baseline_saved_bytes: int | None = None
    peak_bytes: int | None = None

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how; ``quick`` runs a few short rounds (a smoke test, seconds)."""

    #: A registered workload (``normzoo workloads``): its model and slots make the cases.
    workload: str = DEFAULT_WORKLOAD
    norms: tuple[str, ...] = ()
    #: Cases of the workload to measure; empty: all of them (:meth:`selected_cases`).
    cases: tuple[str, ...] = ()
    batch_size: int = 256
    threads: int = 2
    device: str = "cpu"
    rounds: int = 7
    min_run_time: float = 0.5
    quick: bool = False
    #: For :func:`~normzoo.bench.pipelines.end_to_end`: the epochs each pipeline trains, and
    #: whether the harness also runs compiled (``normzoo run --compile``), compile time included.
    epochs: int = 1
    compile: bool = False

    def selected_cases(self) -> tuple[str, ...]:
        """The cases measured: those given, or every case of the workload."""
        return self.cases or workload_cases(self.workload)

    def timing(self) -> tuple[int, float]:
        """The rounds and the minimum run time of each timing that are used: ``quick``
        replaces both (and is what a results file records)."""
        return (3, 0.05) if self.quick else (self.rounds, self.min_run_time)

    def validate(self) -> None:
        valid = workload_cases(self.workload)
        for case in self.cases:
            if case not in valid:
                raise NormzooError(f"workload {self.workload!r}: {suggest('case', case, valid)}")
        if self.batch_size < 2:
            raise NormzooError(
                f"batch size must be >= 2 for batch statistics, got {self.batch_size}"
            )
        if self.threads < 1:
            raise NormzooError(f"threads must be >= 1, got {self.threads}")
        if self.epochs < 1:
            raise NormzooError(f"epochs must be >= 1, got {self.epochs}")
        for norm in self.norms:
            registry.info(norm)


def workload_model(workload: str, norm: str) -> nn.Module:
    """The model of ``workload`` with ``norm`` in its slots, as ``normzoo run`` builds it: with
    the workload's declared defaults (resnet's ReLU), not LeNet's sigmoid."""
    return build_model(RunConfig.for_workload(workload=workload, norm=norm))


def _case(
    case: str, norm: str, images: torch.Tensor, labels: torch.Tensor, workload: str
) -> Callable[[], None]:
    """A zero-argument callable that runs ``case`` of ``workload`` once for ``norm``."""
    torch.manual_seed(0)
    slot, mode = _case_table(workload)[case]
    if slot is not None:
        return _layer_case(slot, mode, norm, images.shape[0], images.device)
    model = workload_model(workload, norm).to(images.device)
    if mode == "eval":
        model.eval()

        def forward() -> None:
            with torch.no_grad():
                model(images)

        return forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    return step


def _layer_case(
    slot: Slot, mode: str, norm: str, batch: int, device: torch.device
) -> Callable[[], None]:
    """One norm layer alone on a random input of ``slot``'s shape (mean 1, deviation 2)."""
    module = registry.build(norm, slot.channels, slot.layout).to(device)
    generator = torch.Generator().manual_seed(0)
    shape = slot.input_shape(batch)
    x = torch.randn(shape, generator=generator).mul_(2).add_(1).to(device)
    if mode == "eval":
        with torch.no_grad():
            module(x)  # running statistics of this data
        module.eval()

        def forward() -> None:
            with torch.no_grad():
                module(x)

        return forward
    x.requires_grad_(True)
    upstream = torch.randn(x.shape, generator=generator).to(device)

    def forward_backward() -> None:
        x.grad = None
        module(x).backward(upstream)

    return forward_backward


def saved_bytes(function: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves for the backward during one call of ``function``
    (a tensor saved twice counted once; a view counts its own elements, not its storage's)."""
    saved: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.data_ptr(), tensor.numel()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(saved.values())


def _seconds(function: Callable[[], None], threads: int, min_run_time: float, device) -> float:
    timer = Timer(stmt="function()", globals={"function": function}, num_threads=threads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure(
    case: str,
    norm: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: BenchConfig,
) -> Measurement:
    """Time ``case`` of ``config.workload`` for ``norm`` against the baseline in alternating
    rounds."""
    device = images.device
    candidate = _case(case, norm, images, labels, config.workload)
    baseline = _case(case, baseline_of(config.workload), images, labels, config.workload)
    rounds, min_run_time = config.timing()
    for function in (candidate, baseline):  # warm-up: allocator, lazy init, caches
        for _ in range(3):
            function()
    times, baseline_times, ratios = [], [], []
    for _ in range(rounds):
        times.append(_seconds(candidate, config.threads, min_run_time, device))
        baseline_times.append(_seconds(baseline, config.threads, min_run_time, device))
        ratios.append(times[-1] / baseline_times[-1])
    ratio = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio, ratio, ratio]
    memory: dict[str, int | None] = {}
    if case.endswith("-train"):
        memory["saved_bytes"] = saved_bytes(candidate)
        memory["baseline_saved_bytes"] = saved_bytes(baseline)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            candidate()
            torch.cuda.synchronize(device)
            memory["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return Measurement(
        **memory,
        norm=norm,
        case=case,
        seconds=statistics.median(times),
        baseline_seconds=statistics.median(baseline_times),
        ratio=ratio,
        spread=(quartiles[2] - quartiles[0]) / ratio,
        rounds=rounds,
    )


def run_bench(
    config: BenchConfig,
    on_result: Callable[[Measurement], None] = lambda m: None,
    on_skip: Callable[[str, str, str], None] = lambda norm, case, reason: None,
) -> list[Measurement]:
    """Measure every case of ``config`` for every norm of it (all registered norms by default)
    on the first ``batch_size`` training examples of the workload's data.

    A case that a norm cannot run (e.g. ``lenet-*`` for a norm without LeNet's ``fc``
    layout) is left out, and ``on_skip(norm, case, reason)`` says why.
    """
    config.validate()
    device = resolve_device(config.device)
    norms = config.norms or tuple(norm.name for norm in registry.available())
    data = registry.workload(config.workload).data(None, False).train
    images = data.images[: config.batch_size].clone().to(device)
    labels = data.labels[: config.batch_size].clone().to(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    results = []
    try:
        for norm in norms:
            for case in config.selected_cases():
                try:
                    result = measure(case, norm, images, labels, config)
                except NormzooError as error:
                    on_skip(norm, case, str(error))
                    continue
                except Exception as error:  # a norm that fails on these inputs (eigh not
                    # converging on a random batch) costs its case, not the measurement
                    on_skip(norm, case, f"failed: {describe(error)}")
                    continue
                results.append(result)
                on_result(result)
    finally:
        torch.set_num_threads(previous_threads)
    return results


def format_table(results: Sequence[Measurement], config: BenchConfig) -> str:
    """A Markdown table of the results, with the settings they were measured under."""
    lines = [
        f"workload {config.workload}, batch {config.batch_size}, {config.threads} thread(s), "
        f"device {config.device}, baseline {baseline_of(config.workload)} in the same rounds",
        "",
        "| norm | case | ms | baseline ms | ratio | spread | saved for backward (ratio) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in results:
        flag = " (noisy)" if m.noisy else ""
        memory = "-"
        if m.saved_bytes is not None and m.baseline_saved_bytes:
            memory = (
                f"{m.saved_bytes / 2**20:.2f} MiB ({m.saved_bytes / m.baseline_saved_bytes:.2f})"
            )
        lines.append(
            f"| {m.norm} | {m.case} | {m.seconds * 1e3:.2f} | {m.baseline_seconds * 1e3:.2f} | "
            f"{m.ratio:.2f} | {m.spread:.0%}{flag} | {memory} |"
        )
    return "\n".join(lines)


def to_json(
    results: Sequence[Measurement],
    config: BenchConfig,
    pipeline: EndToEnd | None = None,
    command: str = "normzoo bench",
) -> dict[str, Any]:
    """The results, the settings, the machine and the command that measured them, as a
    JSON-ready dict (what ``--json`` writes and ``--page`` stores).

    The settings are what was run: the cases measured (not an empty "all"), the rounds and
    run time that ``--quick`` replaced, and the workload only when it is not
    :data:`DEFAULT_WORKLOAD` (a ``lenet`` file reads as it did before workloads existed).
    """
    rounds, min_run_time = config.timing()
    settings = asdict(config) | {
        "cases": list(config.selected_cases()),
        "rounds": rounds,
        "min_run_time": min_run_time,
    }
    if config.workload == DEFAULT_WORKLOAD:
        del settings["workload"]
    return {
        "command": command,
        "machine": machine_description(),
        "config": settings,
        "torch": torch.__version__,
        "results": [asdict(m) | {"noisy": m.noisy} for m in results],
        "end_to_end": None
        if pipeline is None
        else asdict(pipeline)
        | {
            "ratio": pipeline.ratio,
            "compiled_ratio": pipeline.compiled_ratio,
        },  # fmt: skip
    }


def write_json(path: Path | str, data: dict[str, Any]) -> None:
    """:func:`to_json`'s dict, written atomically."""
    atomic_write_json(Path(path).expanduser(), data)
