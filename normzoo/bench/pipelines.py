"""The whole training loop, timed: the harness against the textbook pipeline.

The one-step cases of :mod:`normzoo.bench.timing` leave out what a run spends around the model
(reading and batching the data, the test after each epoch). :func:`end_to_end` times that as
well, comparing the harness (data on the device, batches by indexing) with the pipeline the
book teaches (``torchvision.datasets.FashionMNIST`` with ``ToTensor``, a ``DataLoader``), both
training the same model, so the ratio is the price or gain of the harness's data path.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from normzoo import registry
from normzoo.bench.timing import BenchConfig, workload_model
from normzoo.harness.group import resolve_device


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
    """``config.epochs`` epochs of training, each followed by a test, through the harness (the
    workload's data on the device, batches by indexing) and through the textbook pipeline
    (``torchvision.datasets.FashionMNIST`` with ``ToTensor``, a ``DataLoader`` with
    ``shuffle=True`` and no worker processes: the machine's cores go to torch's threads), the
    same model of ``config.workload`` with ``norm``, same batch size, in alternating rounds;
    with ``config.compile``, the harness compiled as well, a fresh model and compilation each
    round (dynamo's caches reset; inductor's on-disk cache, which makes a second compilation of
    the same graphs faster on any machine, stays). ``examples`` limits all to the first
    training and test examples (``--quick``: 2,048).

    The textbook side always reads Fashion-MNIST, so the comparison is like for like for the
    workloads that train on it (the bundled ``lenet`` and ``mlp``).
    """
    from normzoo.harness.train import train

    examples = examples or (2048 if config.quick else None)
    device = resolve_device(config.device)
    data = registry.workload(config.workload).data(None, False).subset(examples, examples)
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
                    model = workload_model(config.workload, norm).to(device)
                    started = time.perf_counter()
                    train(model, data.to(device), epochs, 0.1, config.batch_size, 0, norm,
                          progress=False, compile=compile)  # fmt: skip
                    speeds.append(epochs * len(data.train) / (time.perf_counter() - started))
                model = workload_model(config.workload, norm).to(device)
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

    from normzoo.workloads.data import FILES, bundled_dir

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
