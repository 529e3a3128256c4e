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

The arithmetic is the textbook's, arranged to read each tensor as few times as possible
(:class:`BatchNormFunction`): two passes for the moments, one multiply-add for the output, and
a backward derived by hand instead of recorded op by op, which keeps only the input for it.

float16 and bfloat16 inputs are normalized in float32 and the output cast back, as torch does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from normzoo import distributed
from normzoo.base import NormBase
from normzoo.hookspecs import hookimpl
from normzoo.interface import (
    AFFINE,
    EPS,
    MOMENTUM,
    SYNC,
    NormInfo,
    check_batch_size,
    check_input,
)
from normzoo.layouts import LAYOUT_NAMES, Layout
from normzoo.stats import (
    batch_moments,
    channel_sum,
    global_batch_moments,
    multiply_add,
    unbiased,
    upcast,
)

NAME = "batchnorm"


class BatchNormFunction(torch.autograd.Function):
    """Batch norm's train-mode forward and its hand-derived backward.

    Forward, per channel over the ``m`` values of the reduced dimensions::

        mean, var = E[x], E[(x - mean)^2]                     two passes (stats.batch_moments)
        s = gamma / sqrt(var + eps),  t = beta - mean * s      per channel
        y = s * x + t                                          one multiply-add

    Backward. With ``x_hat = (x - mean) * r``, ``r = 1 / sqrt(var + eps)``, and ``g = dL/dy``,
    the chain rule through ``mean`` and ``var`` (both depend on every ``x_j``) gives::

        dL/dbeta  = sum g
        dL/dgamma = sum g * x_hat = r * (sum g * x - mean * sum g)
        dL/dx     = gamma * r / m * (m g - sum g - x_hat * sum g * x_hat)

    since ``d mean / dx_j = 1/m`` and ``d var / dx_j = 2 (x_j - mean) / m``, so that
    ``d x_hat_i / dx_j = r (delta_ij - 1/m - x_hat_i x_hat_j / m)``. Expanded per channel,
    ``dL/dx = a g + b x + c`` with ``a = gamma r``, ``b = -gamma r^2 (sum g x_hat) / m`` and
    ``c = -gamma r (sum g) / m - b mean``: two reductions and two multiply-adds. Only the input
    is kept for the backward (``x_hat`` is recomputed from it), as torch keeps it too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        layout: Layout,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = upcast(x)
        mean, var = batch_moments(values, layout)
        invstd = torch.rsqrt(var + eps)
        shape = mean.shape
        scale = invstd if weight is None else invstd * weight.to(values.dtype).reshape(shape)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(values.dtype).reshape(shape)
        y = multiply_add(values, scale, shift).to(x.dtype)
        ctx.save_for_backward(x, mean, invstd, scale)
        ctx.layout, ctx.has_weight, ctx.has_bias = layout, weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, *unused: Any) -> tuple[torch.Tensor | None, ...]:
        x, mean, invstd, scale = ctx.saved_tensors
        values, g = upcast(x), upcast(grad)
        count = values.numel() // mean.numel()
        sum_g = channel_sum(g, ctx.layout).reshape(mean.shape)
        sum_gx = channel_sum(g * values, ctx.layout).reshape(mean.shape)
        sum_g_xhat = invstd * (sum_gx - mean * sum_g)
        b = -scale * invstd * sum_g_xhat / count
        c = -scale * sum_g / count - b * mean
        grad_x = multiply_add(values, b, multiply_add(g, scale, c)).to(x.dtype)
        grad_weight = sum_g_xhat.reshape(-1) if ctx.has_weight else None
        grad_bias = sum_g.reshape(-1) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None


class BatchNorm(NormBase):
    """Batch norm from scratch; the statistics live in registered buffers.

    Parameters are those of :class:`~normzoo.NormBase`: ``num_features``, ``layout``, ``eps``,
    ``momentum`` (``None``: cumulative average) and ``affine``; and ``sync``: under
    torch.distributed with several processes, the train-mode statistics are those of the
    global batch (:func:`normzoo.stats.global_batch_moments`; autograd then differentiates
    across processes in place of the hand-written backward).

    In ``train()`` mode the output uses the batch statistics and updates the running ones; in
    ``eval()`` mode it uses the running statistics, ``y = s x + t`` with the per-channel
    ``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean s``, and changes
    nothing.
    """

    def __init__(
        self,
        num_features: int,
        layout: str,
        eps: float,
        momentum: float | None,
        affine: bool,
        sync: bool,
    ) -> None:
        super().__init__(num_features, layout, eps, momentum, affine)
        self.sync = sync
        self.register_running_stat("running_mean", partial(torch.zeros, num_features))
        self.register_running_stat("running_var", partial(torch.ones, num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME)
        layout = self.layout_spec
        shape = layout.channel_shape(self.num_features)
        if self.training and distributed.active(self.sync):
            return self._global_forward(x)
        if self.training:
            check_batch_size(x, NAME, self.layout)
            y, mean, var = BatchNormFunction.apply(x, self.weight, self.bias, layout, self.eps)
            count = layout.values_per_channel(x)
            self.update_running_stats(
                running_mean=mean.reshape(-1), running_var=unbiased(var, count).reshape(-1)
            )
            return y
        values = upcast(x)
        scale = torch.rsqrt(self.running_var.to(values.dtype) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(values.dtype)
        shift = -self.running_mean.to(values.dtype) * scale
        if self.bias is not None:
            shift = shift + self.bias.to(values.dtype)
        return multiply_add(values, scale.reshape(shape), shift.reshape(shape)).to(x.dtype)

    def _global_forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var, count = global_batch_moments(x, self.layout_spec)
        check_batch_size(x, NAME, self.layout, values=float(count))
        y = self.affine_transform((upcast(x) - mean) * torch.rsqrt(var + self.eps))
        self.update_running_stats(
            running_mean=mean.detach().reshape(-1),
            running_var=unbiased(var.detach(), count).reshape(-1),
        )
        return y.to(x.dtype)


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=NAME,
            summary="batch norm written from scratch, the textbook algorithm with buffers",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=BatchNorm,
            options=(EPS, MOMENTUM, AFFINE, SYNC),
            reference="Ioffe & Szegedy, Batch Normalization, ICML 2015; "
            "Dive into Deep Learning, section 8.5 (7.5 in v0.17)",
        )
    )
