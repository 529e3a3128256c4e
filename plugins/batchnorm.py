"""Batch normalization written from scratch (Ioffe & Szegedy 2015; Dive into Deep Learning 8.5).

Train mode, per channel over every value it has in the batch (``N`` for ``fc``, ``N, H, W`` for
``conv``, ``N, L`` for ``seq`` and ``conv1d``, ``N, D, H, W`` for ``conv3d``)::

    mean = E[x],  var = E[(x - mean)^2]          (biased: divides by the count m)
    y    = gamma * (x - mean) / sqrt(var + eps) + beta

Running statistics, used in eval mode instead of the batch ones, follow torch's convention:
``running = (1 - momentum) * running + momentum * batch`` with ``momentum=0.1``, and the running
variance takes the unbiased batch variance ``var * m / (m - 1)``. (The book's code writes
``momentum * running + (1 - momentum) * batch`` with 0.9: the same average, other naming.)
``momentum=None`` keeps a cumulative average instead, the plain mean of the batch statistics.

float16 and bfloat16 inputs are normalized in float32 and the output cast back, as torch does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from normzoo.base import NormBase
from normzoo.hookspecs import hookimpl
from normzoo.interface import AFFINE, EPS, MOMENTUM, NormInfo, check_batch_size, check_input
from normzoo.layouts import LAYOUT_NAMES
from normzoo.stats import batch_moments, unbiased, upcast

NAME = "batchnorm"


class BatchNorm(NormBase):
    """Batch norm from scratch; the statistics live in registered buffers.

    Parameters are those of :class:`~normzoo.NormBase`: ``num_features``, ``layout``, ``eps``,
    ``momentum`` (``None``: cumulative average) and ``affine``.

    In ``train()`` mode the output uses the batch statistics and updates the running ones; in
    ``eval()`` mode it uses the running statistics and changes nothing.
    """

    def __init__(
        self,
        num_features: int,
        layout: str,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, layout, eps, momentum, affine)
        self.register_running_stat("running_mean", partial(torch.zeros, num_features))
        self.register_running_stat("running_var", partial(torch.ones, num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME)
        layout = self.layout_spec
        if self.training:
            check_batch_size(x, NAME, self.layout)
            mean, var = batch_moments(x, layout)
            count = layout.values_per_channel(x)
            self.update_running_stats(
                running_mean=mean.reshape(-1), running_var=unbiased(var, count).reshape(-1)
            )
        else:
            shape = layout.channel_shape(self.num_features)
            dtype = upcast(x).dtype
            mean = self.running_mean.to(dtype).reshape(shape)
            var = self.running_var.to(dtype).reshape(shape)
        x_hat = (upcast(x) - mean) / torch.sqrt(var + self.eps)
        return self.affine_transform(x_hat).to(x.dtype)


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=NAME,
            summary="batch norm written from scratch, the textbook algorithm with buffers",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=BatchNorm,
            options=(EPS, MOMENTUM, AFFINE),
            reference="Ioffe & Szegedy, Batch Normalization, ICML 2015; "
            "Dive into Deep Learning, section 8.5 (7.5 in v0.17)",
        )
    )
