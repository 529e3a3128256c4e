"""``normzoo bench``: what a norm costs, as a ratio to torch's batch norm measured in the same run.

Separate runs on a shared machine mislead (two runs of the same code differ by more than the
norms do), so every case times the candidate and the baseline (``torch-batchnorm`` in the same
slots) in alternating rounds, each round a :class:`torch.utils.benchmark.Timer`
``blocked_autorange`` after a warm-up, and reports the median of the per-round ratios. The
thread count is fixed and reported. Cases:

``lenet-train``
    one LeNet training step at the chapter's settings (forward, cross-entropy, backward, SGD
    step) on a batch of Fashion-MNIST, the norm in all four slots;
``lenet-eval``
    the eval-mode forward of the same model on the same batch.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.benchmark import Timer

import normzoo
from normzoo.errors import NormzooError, suggest
from normzoo.harness.data import load_fashion_mnist
from normzoo.harness.model import build_lenet
from normzoo.harness.runs import atomic_write_json
from normzoo.harness.train import resolve_device

BASELINE = "torch-batchnorm"
CASES = ("lenet-train", "lenet-eval")
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
        for norm in self.norms:
            normzoo.info(norm)


def _case(case: str, norm: str, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """A zero-argument callable that runs ``case`` once for ``norm``."""
    torch.manual_seed(0)
    model = build_lenet(norm).to(images.device)
    if case == "lenet-eval":
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
    rounds, min_run_time = (3, 0.05) if config.quick else (config.rounds, config.min_run_time)
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
    return Measurement(
        norm=norm,
        case=case,
        seconds=statistics.median(times),
        baseline_seconds=statistics.median(baseline_times),
        ratio=ratio,
        spread=(quartiles[2] - quartiles[0]) / ratio,
        rounds=rounds,
    )


def run_bench(
    config: BenchConfig, on_result: Callable[[Measurement], None] = lambda m: None
) -> list[Measurement]:
    """Measure every case for every norm of ``config`` (all registered norms by default)."""
    config.validate()
    device = resolve_device(config.device)
    norms = config.norms or tuple(norm.name for norm in normzoo.available())
    data = load_fashion_mnist().train
    images = data.images[: config.batch_size].to(device)
    labels = data.labels[: config.batch_size].to(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    results = []
    try:
        for norm in norms:
            for case in config.cases:
                try:
                    result = measure(case, norm, images, labels, config)
                except NormzooError:
                    continue  # e.g. a norm that does not support LeNet's layouts
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
        "| norm | case | ms | baseline ms | ratio | spread |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in results:
        flag = " (noisy)" if m.noisy else ""
        lines.append(
            f"| {m.norm} | {m.case} | {m.seconds * 1e3:.2f} | {m.baseline_seconds * 1e3:.2f} | "
            f"{m.ratio:.2f} | {m.spread:.0%}{flag} |"
        )
    return "\n".join(lines)


def write_json(path: Path | str, results: Sequence[Measurement], config: BenchConfig) -> None:
    """The results and the settings as JSON, written atomically."""
    atomic_write_json(
        Path(path).expanduser(),
        {
            "config": asdict(config),
            "torch": torch.__version__,
            "results": [asdict(m) | {"noisy": m.noisy} for m in results],
        },
    )
