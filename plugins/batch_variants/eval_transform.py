"""Batch norm's eval transform, with running statistics: what ``batchrenorm`` and ``ghostbn``
compute in eval mode and ``frozenbn`` in both modes.

One function for the three, so that each computes exactly ``batchnorm``'s eval-mode arithmetic
(and ``torchvision.ops.FrozenBatchNorm2d``'s), and a change to it changes them together.
"""

from __future__ import annotations

import torch

from normzoo.layouts import Layout
from normzoo.stats import multiply_add, upcast


def running_normalize(
    x: torch.Tensor,
    layout: Layout,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Batch norm's eval transform, ``y = s x + t`` per channel with
    ``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``: the arithmetic
    of ``batchnorm``'s eval mode and of ``torchvision.ops.FrozenBatchNorm2d``, in
    :func:`~normzoo.stats.compute_dtype`."""
    values = upcast(x)
    scale = torch.rsqrt(running_var.to(values.dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(values.dtype)
    shift = -running_mean.to(values.dtype) * scale
    if bias is not None:
        shift = shift + bias.to(values.dtype)
    shape = layout.channel_shape(scale.shape[0])
    return multiply_add(values, scale.reshape(shape), shift.reshape(shape)).to(x.dtype)
