"""Batch normalization written from scratch (Ioffe & Szegedy 2015; Dive into Deep Learning 8.5).

Train mode, per channel over the batch (``N`` for ``fc``, ``N, H, W`` for ``conv``)::

    mean = E[x],  var = E[(x - mean)^2]          (biased: divides by the count m)
    y    = gamma * (x - mean) / sqrt(var + eps) + beta

Running statistics, used in eval mode instead of the batch ones, follow torch's convention:
``running = (1 - momentum) * running + momentum * batch`` with ``momentum=0.1``, and the running
variance takes the unbiased batch variance ``var * m / (m - 1)``. (The book's code writes
``momentum * running + (1 - momentum) * batch`` with 0.9: the same average, other naming.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normzoo.hookspecs import hookimpl
from normzoo.interface import NormInfo, Option, check_batch_size, check_input
from normzoo.stats import (
    batch_moments,
    channel_affine,
    channel_shape,
    unbiased,
    update_running,
    values_per_channel,
)

NAME = "batchnorm"


class BatchNorm(nn.Module):
    """Batch norm from scratch; the statistics live in registered buffers.

    Parameters
    ----------
    num_features:
        Number of channels ``C``.
    layout:
        ``"fc"`` for ``(N, C)`` input, ``"conv"`` for ``(N, C, H, W)``.
    eps:
        Added to the variance before the square root.
    momentum:
        Weight of the new batch in the running averages.

    In ``train()`` mode the output uses the batch statistics and updates the running ones; in
    ``eval()`` mode it uses the running statistics and changes nothing.
    """

    def __init__(self, num_features: int, layout: str, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.layout = layout
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME)
        shape = channel_shape(self.num_features, self.layout)
        if self.training:
            check_batch_size(x, NAME)
            mean, var = batch_moments(x, self.layout)
            self._update_running_stats(mean.reshape(-1), var.reshape(-1), values_per_channel(x))
        else:
            mean = self.running_mean.reshape(shape)
            var = self.running_var.reshape(shape)
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return channel_affine(x_hat, self.weight, self.bias, self.layout)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        update_running(self.running_mean, mean, self.momentum)
        update_running(self.running_var, unbiased(var, count), self.momentum)
        self.num_batches_tracked += 1

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, layout={self.layout!r}, eps={self.eps}, momentum={self.momentum}"
        )


EPS = Option("eps", float, 1e-5, "added to the variance before the square root", minimum=0.0)
MOMENTUM = Option(
    "momentum", float, 0.1, "weight of the new batch in the running statistics", 0.0, 1.0
)


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=NAME,
            summary="batch norm written from scratch, the textbook algorithm with buffers",
            layouts=("fc", "conv"),
            uses_batch_stats=True,
            factory=BatchNorm,
            options=(EPS, MOMENTUM),
            reference="Ioffe & Szegedy, Batch Normalization, ICML 2015; "
            "Dive into Deep Learning, section 8.5 (7.5 in v0.17)",
        )
    )
