"""The training loop: minibatch SGD with cross-entropy, per-epoch metrics, a live progress bar.

The data sit on the device as whole tensors; each epoch draws a permutation from a seeded
generator and slices batches out of it, so the same seed gives the same numbers on a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from normzoo.harness.data import FashionMNIST, Split
from normzoo.interface import NormzooError

EVAL_BATCH = 2048


class TrainingDiverged(NormzooError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured; ``examples_per_sec`` counts training examples only."""

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    examples_per_sec: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"epoch {self.epoch:>2}: train loss {self.train_loss:.3f}, train acc "
            f"{self.train_acc:.3f}, test acc {self.test_acc:.3f}, "
            f"{self.examples_per_sec:,.0f} examples/s"
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU; anything else must be a usable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NormzooError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NormzooError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def batch_bounds(size: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every complete batch; the incomplete last one is dropped.

    Raises :class:`NormzooError` when not even one batch fits.
    """
    if size < batch_size:
        raise NormzooError(
            f"the training set has {size} examples, fewer than one batch of {batch_size}; "
            "use a smaller --batch-size or a larger --train-subset"
        )
    return [(start, start + batch_size) for start in range(0, size - batch_size + 1, batch_size)]


@torch.no_grad()
def reestimate_running_stats(
    model: nn.Module, split: Split, batch_size: int, num_batches: int, generator: torch.Generator
) -> int:
    """Replace the running statistics by their average over ``num_batches`` fresh batches.

    During training at a large learning rate the running averages trail the weights: they mix
    statistics of many past versions of the network, so eval-mode accuracy lags and swings
    from epoch to epoch. This "precise BN" step (Wu & Johnson, *Rethinking "Batch" in
    BatchNorm*, 2021) runs forward passes in train mode with frozen weights and sets each
    norm's ``momentum`` to ``1/k`` at the k-th batch, which turns the exponential average into
    the plain mean of the ``num_batches`` batch statistics. It applies to every module with a
    float ``momentum`` attribute that weights the new batch in its running averages (all the
    bundled norms with running statistics); the original momenta are restored afterwards.

    Returns the number of modules whose statistics were re-estimated.
    """
    norms = [m for m in model.modules() if isinstance(getattr(m, "momentum", None), float)]
    if not norms:
        return 0
    saved = [module.momentum for module in norms]
    order = torch.randperm(len(split), generator=generator).to(split.images.device)
    model.train()
    try:
        for k, (start, stop) in enumerate(batch_bounds(len(split), batch_size)[:num_batches], 1):
            for module in norms:
                module.momentum = 1.0 / k
            model(split.images[order[start:stop]])
    finally:
        for module, momentum in zip(norms, saved, strict=True):
            module.momentum = momentum
    return len(norms)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH) -> float:
    """Fraction of ``split`` that ``model`` classifies correctly, in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        logits = model(split.images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == split.labels[start : start + batch_size]).sum())
    return correct / max(len(split), 1)


def train(
    model: nn.Module,
    data: FashionMNIST,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    label: str,
    on_epoch: Callable[[EpochMetrics], None] = lambda metrics: None,
    progress: bool = True,
    precise_stats: int = 0,
) -> list[EpochMetrics]:
    """Train ``model`` on ``data.train`` and measure it on ``data.test`` after every epoch.

    Parameters
    ----------
    precise_stats:
        When positive, re-estimate the norms' running statistics over this many training
        batches with the epoch's final weights before testing (see
        :func:`reestimate_running_stats`); 0 keeps the running averages from training, the
        chapter's protocol.
    label:
        Names the run (the norm) in the progress bar and in errors.
    on_epoch:
        Called with each epoch's metrics as soon as they exist, e.g. to write them to disk.

    Raises :class:`TrainingDiverged` when a batch loss is not finite; the epochs already
    reported through ``on_epoch`` stay reported.

    An incomplete last batch is dropped (a fresh permutation each epoch still reaches every
    example): a few leftover examples give batch statistics so noisy, or a covariance so
    singular, that one step at the chapter's lr 1.0 can undo an epoch (60,000 examples in
    batches of 256 drop 96 per epoch).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    stats_generator = torch.Generator().manual_seed(seed + 1)  # training order stays the same
    device = data.train.images.device
    size = len(data.train)
    batches = batch_bounds(size, batch_size)
    history: list[EpochMetrics] = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(size, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        started = time.perf_counter()
        bar = tqdm(
            batches, desc=f"{label} epoch {epoch}/{epochs}", unit="batch", leave=False,
            disable=not progress, dynamic_ncols=True,
        )  # fmt: skip
        for step, (start, stop) in enumerate(bar):
            index = order[start:stop]
            images, labels = data.train.images[index], data.train.labels[index]
            logits = model(images)
            loss = loss_fn(logits, labels)
            value = float(loss.detach())  # one sync per batch: needed for the NaN check and the bar
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} in epoch {epoch} (batch {step + 1}) with norm "
                    f"{label!r}; try a smaller --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count = stop - start
            loss_sum += loss.detach() * count
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += count
            if progress:
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        bar.close()
        if precise_stats:
            reestimate_running_stats(model, data.train, batch_size, precise_stats, stats_generator)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=float(loss_sum) / seen,
            train_acc=int(correct) / seen,
            test_acc=accuracy(model, data.test),
            examples_per_sec=seen / elapsed,
            seconds=elapsed,
        )
        history.append(metrics)
        on_epoch(metrics)
    return history
