"""The batch covariance each norm layer of a trained model sees: its rank and conditioning.

Whitening ``C`` channels together (``zca`` with ``group_size`` at least ``C``) multiplies by the
inverse square root of one batch's ``C x C`` covariance plus ``eps``. That estimate is made from
the batch's values of each channel: ``N`` of them in a fully connected layer, ``N * H * W`` in a
conv layer. Centred, ``n`` samples span at most ``n - 1`` directions, so at batch 16 a fully
connected layer of 120 channels has a covariance of rank at most 15; in the other 105 directions
whitening divides by ``sqrt(eps)`` whatever the batch holds, and the conditioning of what it
inverts is ``largest eigenvalue / eps``. Groups of 16 channels see the same limit at a batch
of 16 or fewer. :func:`measure` puts numbers on it for each norm layer of a model and each
batch size asked for, from the layer inputs that the model produces on real batches.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

import normzoo
from normzoo.errors import NormzooError
from normzoo.harness.config import RunConfig
from normzoo.layouts import get_layout
from normzoo.workloads.data import Split
from normzoo.workloads.slots import norm_modules, placed_slots

#: The ``eps`` a layer without one of its own is measured with: torch's and normzoo's default.
DEFAULT_EPS = 1e-5
#: The batch sizes measured by default: the chapter's 256 and the smaller ones the pages try.
COVARIANCE_BATCH_SIZES = (16, 64, 256)
#: Batches per batch size by default; the reported numbers are medians over them.
COVARIANCE_BATCHES = 10
#: Channels per group for the grouped condition number: zca's default ``group_size``.
COVARIANCE_GROUP_SIZE = 16


@dataclass(frozen=True)
class CovarianceSpectrum:
    """One norm layer's batch covariance at one batch size, as medians over the batches.

    ``rank`` is the numerical rank of the covariance of all its channels (eigenvalues above
    ``largest * channels * float64 eps``, numpy's ``matrix_rank`` rule); ``condition`` is the
    condition number of that covariance plus ``eps`` (what whitening all channels inverts);
    ``group_condition`` is the largest condition number among its groups of ``group_size``
    channels, each plus ``eps`` (what grouped whitening inverts).
    """

    layer: str
    channels: int
    batch_size: int
    samples: int
    rank: float
    condition: float
    group_condition: float
    group_size: int

    @property
    def rank_bound(self) -> int:
        """The largest rank a centred covariance of ``samples`` values can have."""
        return min(self.channels, self.samples - 1)


def spectrum(features: torch.Tensor, eps: float, group_size: int) -> tuple[int, float, float]:
    """The numerical rank of the covariance of ``features`` (``samples x channels``), the
    condition number of the covariance plus ``eps``, and the largest such condition number
    among consecutive groups of ``group_size`` channels. Computed in float64; the covariance
    is the biased one (divided by ``samples``), as the whitening norms estimate it."""
    x = features.double()
    x = x - x.mean(dim=0)
    covariance = x.T @ x / x.shape[0]
    values = torch.linalg.eigvalsh(covariance)
    tolerance = values.max().clamp(min=0) * covariance.shape[0] * torch.finfo(x.dtype).eps
    rank = int((values > tolerance).sum())

    def condition(eigenvalues: torch.Tensor) -> float:
        shifted = eigenvalues.clamp(min=0) + eps
        return float(shifted.max() / shifted.min())

    groups = [
        condition(torch.linalg.eigvalsh(covariance[start : start + group_size,
                                                   start : start + group_size]))
        for start in range(0, covariance.shape[0], group_size)
    ]  # fmt: skip
    return rank, condition(values), max(groups)


def _channels_last(inputs: torch.Tensor, layout: str) -> torch.Tensor:
    """A norm layer's input as ``samples x channels``: every value of a channel is a sample."""
    axis = get_layout(layout).channel_axis
    return inputs.movedim(axis, -1).reshape(-1, inputs.shape[axis])


def named_norms(model: nn.Module, config: RunConfig) -> list[tuple[str, nn.Module]]:
    """The norm layers of a model that ``config`` built, named by their workload slots
    (``conv1``, ``fc2``, ...), in the slots' order."""
    workload = normzoo.workload(config.workload)
    norms = [module for _, module in norm_modules(model)]
    slots = placed_slots(workload, config.placement)
    if len(slots) != len(norms):  # a workload whose factory fills slots out of order
        return list(norm_modules(model))
    return [(slot.name, module) for slot, module in zip(slots, norms, strict=True)]


@torch.no_grad()
def measure(
    model: nn.Module,
    norms: list[tuple[str, nn.Module]],
    split: Split,
    batch_sizes: list[int],
    batches: int,
    group_size: int,
    seed: int = 0,
) -> list[CovarianceSpectrum]:
    """Each of the ``norms`` layers' :class:`CovarianceSpectrum` (``(name, module)`` pairs of
    ``model``) at each of ``batch_sizes``, the medians over ``batches`` batches drawn from
    ``split`` (the same examples for every batch size: the first ``batch_size`` of each of
    ``batches`` shuffled blocks).

    The model runs in eval mode, so each layer's input is what the trained network passes it
    with its running statistics; in training the inputs differ only by the batch statistics of
    the layers before it. A layer without a ``layout`` is read as ``fc`` or ``conv`` by rank.
    """
    norms = dict(norms)
    if not norms:
        raise NormzooError("the model has no norm layers to measure")
    largest = max(batch_sizes)
    if largest * batches > len(split):
        raise NormzooError(
            f"{batches} batches of {largest} need {largest * batches} examples; the split has "
            f"{len(split)}: ask for fewer --batches or a smaller --batch-size"
        )
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda module, args, name=name: captured.__setitem__(name, args[0])
        )
        for name, module in norms.items()
    ]
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    found: dict[tuple[str, int], list[tuple[int, float, float, int]]] = {}
    model.eval()
    try:
        for batch_size in batch_sizes:
            for block in range(batches):
                index = order[block * largest : block * largest + batch_size]
                model(split.images[index.to(split.images.device)])
                for name, inputs in captured.items():
                    module = norms[name]
                    layout = getattr(module, "layout", "fc" if inputs.dim() == 2 else "conv")
                    features = _channels_last(inputs, layout)
                    eps = float(getattr(module, "eps", DEFAULT_EPS))
                    rank, condition, group = spectrum(features, eps, group_size)
                    found.setdefault((name, batch_size), []).append(
                        (rank, condition, group, features.shape[0])
                    )
    finally:
        for hook in hooks:
            hook.remove()
    return [
        CovarianceSpectrum(
            layer=name,
            channels=int(norms[name].num_features),
            batch_size=batch_size,
            samples=values[0][3],
            rank=statistics.median(v[0] for v in values),
            condition=statistics.median(v[1] for v in values),
            group_condition=statistics.median(v[2] for v in values),
            group_size=group_size,
        )
        for (name, batch_size), values in found.items()
    ]


def table(spectra: list[CovarianceSpectrum]) -> str:
    """A Markdown table of ``spectra``, one row per layer and batch size."""
    group_size = spectra[0].group_size if spectra else 0
    lines = [
        "| layer | channels | batch | values per channel | rank (bound) | "
        f"condition, all channels | condition, worst group of {group_size} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in spectra:
        lines.append(
            f"| {s.layer} | {s.channels} | {s.batch_size} | {s.samples:,} | "
            f"{s.rank:g} ({s.rank_bound}) | {s.condition:.3g} | {s.group_condition:.3g} |"
        )
    return "\n".join(lines)
