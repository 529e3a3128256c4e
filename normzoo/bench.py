"""``normzoo bench``: what a norm costs, as a ratio to torch's batch norm measured in the same run.

Separate runs on a shared machine mislead (two runs of the same code differ by more than the
norms do), so every case times the candidate and the baseline (``torch-batchnorm`` in the same
slots) in alternating rounds, each round a :class:`torch.utils.benchmark.Timer`
``blocked_autorange`` after a warm-up, and reports the median of the per-round ratios. The
thread count is fixed and reported. Cases:

``lenet-train``
    one LeNet training step (the chapter's model with sigmoid; forward, cross-entropy, backward,
    SGD step with lr 0.01) on a batch of Fashion-MNIST, the norm in all four slots;
``lenet-eval``
    the eval-mode forward of the same model on the same batch;
``conv1-train`` ... ``fc2-train``, ``conv1-eval`` ... ``fc2-eval``
    one norm layer alone at each of LeNet's four norm shapes, forward and backward in train
    mode, or the eval forward.

Train cases also count the bytes autograd saves for the backward of one call (through
``torch.autograd.graph.saved_tensors_hooks``, on any device) and, on CUDA, the peak memory.
:func:`end_to_end` times the harness's whole training loop against the textbook pipeline
(``torchvision.datasets.FashionMNIST`` + ``ToTensor`` + ``DataLoader``, same model).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import normzoo
from normzoo.errors import NormzooError, suggest
from normzoo.harness.data import load_fashion_mnist
from normzoo.harness.model import build_lenet
from normzoo.harness.runs import atomic_write_json, machine_description
from normzoo.harness.train import resolve_device

# torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU machines
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

BASELINE = "torch-batchnorm"
#: LeNet's four norm slots: channels, layout and the spatial size of their input.
LAYERS: dict[str, tuple[int, str, tuple[int, ...]]] = {
    "conv1": (6, "conv", (24, 24)),
    "conv2": (16, "conv", (8, 8)),
    "fc1": (120, "fc", ()),
    "fc2": (84, "fc", ()),
}
CASES = (
    "lenet-train",
    "lenet-eval",
    *(f"{layer}-{mode}" for layer in LAYERS for mode in ("train", "eval")),
)
#: A spread (interquartile range of the per-round ratios over their median) above this is
#: flagged: the machine was too busy for the ratio to be trusted to two digits.
NOISY_SPREAD = 0.10


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

    norms: tuple[str, ...] = ()
    cases: tuple[str, ...] = CASES
    batch_size: int = 256
    threads: int = 2
    device: str = "cpu"
    rounds: int = 7
    min_run_time: float = 0.5
    quick: bool = False
    #: For :func:`end_to_end`: the epochs each pipeline trains, and whether the harness also
    #: runs compiled (``normzoo run --compile``), compile time included.
    epochs: int = 1
    compile: bool = False

    def timing(self) -> tuple[int, float]:
        """The rounds and the minimum run time of each timing that are used: ``quick``
        replaces both (and is what a results file records)."""
        return (3, 0.05) if self.quick else (self.rounds, self.min_run_time)

    def validate(self) -> None:
        for case in self.cases:
            if case not in CASES:
                raise NormzooError(suggest("case", case, CASES))
        if self.batch_size < 2:
            raise NormzooError(
                f"batch size must be >= 2 for batch statistics, got {self.batch_size}"
            )
        if self.threads < 1:
            raise NormzooError(f"threads must be >= 1, got {self.threads}")
        if self.epochs < 1:
            raise NormzooError(f"epochs must be >= 1, got {self.epochs}")
        for norm in self.norms:
            normzoo.info(norm)


def _case(case: str, norm: str, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """A zero-argument callable that runs ``case`` once for ``norm``."""
    torch.manual_seed(0)
    layer, _, mode = case.partition("-")
    if layer in LAYERS:
        return _layer_case(layer, mode, norm, images.shape[0], images.device)
    model = build_lenet(norm).to(images.device)
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
    layer: str, mode: str, norm: str, batch: int, device: torch.device
) -> Callable[[], None]:
    channels, layout, spatial = LAYERS[layer]
    module = normzoo.build(norm, channels, layout).to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, channels, *spatial), generator=generator).mul_(2).add_(1).to(device)
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
    """Time ``case`` for ``norm`` against the baseline in alternating rounds."""
    device = images.device
    candidate = _case(case, norm, images, labels)
    baseline = _case(case, BASELINE, images, labels)
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
    """Measure every case for every norm of ``config`` (all registered norms by default).

    A case that a norm cannot run (e.g. ``lenet-*`` for a norm without LeNet's ``fc``
    layout) is left out, and ``on_skip(norm, case, reason)`` says why.
    """
    config.validate()
    device = resolve_device(config.device)
    norms = config.norms or tuple(norm.name for norm in normzoo.available())
    data = load_fashion_mnist().train
    images = data.images[: config.batch_size].clone().to(device)
    labels = data.labels[: config.batch_size].clone().to(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    results = []
    try:
        for norm in norms:
            for case in config.cases:
                try:
                    result = measure(case, norm, images, labels, config)
                except NormzooError as error:
                    on_skip(norm, case, str(error))
                    continue
                results.append(result)
                on_result(result)
    finally:
        torch.set_num_threads(previous_threads)
    return results


def format_table(results: Sequence[Measurement], config: BenchConfig) -> str:
    """A Markdown table of the results, with the settings they were measured under."""
    lines = [
        f"batch {config.batch_size}, {config.threads} thread(s), device {config.device}, "
        f"baseline {BASELINE} in the same rounds",
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
    JSON-ready dict (what ``--json`` writes and ``--page`` stores)."""
    rounds, min_run_time = config.timing()  # what was run: --quick replaces both
    return {
        "command": command,
        "machine": machine_description(),
        "config": asdict(config) | {"rounds": rounds, "min_run_time": min_run_time},
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


@dataclass(frozen=True)
class EndToEnd:
    """Training examples per second, evaluation included, of the harness and of the textbook
    pipeline, each the median over alternating rounds, and their ratio; with ``--compile``,
    also of the harness running its training steps compiled (compile time included)."""

    norm: str
    examples: int
    harness_examples_per_sec: float
    textbook_examples_per_sec: float
    epochs: int = 1
    compiled_examples_per_sec: float | None = None

    @property
    def ratio(self) -> float:
        return self.harness_examples_per_sec / self.textbook_examples_per_sec

    @property
    def compiled_ratio(self) -> float | None:
        if self.compiled_examples_per_sec is None:
            return None
        return self.compiled_examples_per_sec / self.textbook_examples_per_sec


def end_to_end(
    config: BenchConfig, norm: str = "batchnorm", examples: int | None = None, rounds: int = 2
) -> EndToEnd:
    """``config.epochs`` epochs of training, each followed by a test, through the harness (data
    on the device, batches by indexing) and through the textbook pipeline
    (``torchvision.datasets.FashionMNIST`` with ``ToTensor``, a ``DataLoader`` with
    ``shuffle=True`` and no worker processes: the machine's cores go to torch's threads), same
    LeNet and norm, same batch size, in alternating rounds; with ``config.compile``, the
    harness compiled as well, a fresh model and compilation each round (dynamo's caches reset;
    inductor's on-disk cache, which makes a second compilation of the same graphs faster on
    any machine, stays). ``examples`` limits all to the first training and test examples
    (``--quick``: 2,048)."""
    import tempfile

    from normzoo.harness.train import train

    examples = examples or (2048 if config.quick else None)
    device = resolve_device(config.device)
    data = load_fashion_mnist().subset(examples, examples)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    harness, compiled, textbook = [], [], []
    epochs = config.epochs
    try:
        with tempfile.TemporaryDirectory() as root:
            dataset = _torchvision_copy(Path(root), examples)
            for _ in range(rounds):
                for compile, speeds in ((False, harness), (True, compiled)):
                    if compile and not config.compile:
                        continue
                    if compile:  # dynamo would reuse the last round's graphs for the new model
                        torch._dynamo.reset()
                    model = build_lenet(norm).to(device)
                    started = time.perf_counter()
                    train(model, data.to(device), epochs, 0.1, config.batch_size, 0, norm,
                          progress=False, compile=compile)  # fmt: skip
                    speeds.append(epochs * len(data.train) / (time.perf_counter() - started))
                model = build_lenet(norm).to(device)
                started = time.perf_counter()
                for _ in range(epochs):
                    _textbook_epoch(model, dataset, config.batch_size, device)
                textbook.append(epochs * len(dataset[0]) / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(previous_threads)
    return EndToEnd(
        norm, len(data.train), statistics.median(harness), statistics.median(textbook), epochs,
        statistics.median(compiled) if compiled else None,
    )  # fmt: skip


def _torchvision_copy(root: Path, examples: int | None) -> tuple:
    """torchvision's FashionMNIST (train, test) read from an uncompressed copy of the bundled
    IDX files, as ``download=True`` would have left them."""
    import gzip

    from torch.utils.data import Subset
    from torchvision import datasets, transforms

    from normzoo.harness.data import FILES, bundled_dir

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stems in FILES.values():
        for stem in stems:
            (raw / stem).write_bytes(gzip.decompress((bundled_dir() / f"{stem}.gz").read_bytes()))
    splits = [
        datasets.FashionMNIST(str(root), train=split, transform=transforms.ToTensor())
        for split in (True, False)
    ]
    if examples is not None:
        splits = [Subset(split, range(min(examples, len(split)))) for split in splits]
    return tuple(splits)


def _textbook_epoch(model: nn.Module, dataset: tuple, batch_size: int, device) -> None:
    """The chapter's loop: a DataLoader per split, minibatch SGD, then test accuracy."""
    from torch.utils.data import DataLoader

    train_set, test_set = dataset
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for images, labels in DataLoader(train_set, batch_size, shuffle=True, drop_last=True):
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for images, labels in DataLoader(test_set, batch_size):
            model(images.to(device)).argmax(dim=1).eq(labels.to(device)).sum()
