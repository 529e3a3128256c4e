"""Batch norm of groups of examples, with the groups' statistics given and a hand-derived
backward: ghost batch norm's virtual batches, and batch renorm's one group (the whole batch).

``ghostbn`` and ``batchrenorm`` both normalize with statistics they compute themselves (batch
renorm then folds its corrections ``r`` and ``d``, constants for the gradient, into the affine),
so one autograd function with batch norm's backward per group serves both, and like batch norm
it keeps only the input for the backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from normzoo.layouts import Layout
from normzoo.stats import channel_sum, multiply_add, upcast


def _example_sums(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(N, C)``: each example's sum over each channel's values (over ``H, W`` for ``conv``,
    over ``L`` for ``seq``)."""
    if x.dim() == 2:
        return x
    if layout.channels_last:
        return x.sum(dim=tuple(range(1, x.dim() - 1)))
    return x.flatten(2).sum(dim=2)


def group_sums(
    x: torch.Tensor, group: torch.Tensor | None, groups: int, layout: Layout
) -> torch.Tensor:
    """``(groups, C)``: the per-channel sums of ``x`` over the examples of each group;
    ``group[i]`` is example ``i``'s (``None``: one group of every example)."""
    if group is None:
        return channel_sum(x, layout).unsqueeze(0)
    table = x.new_zeros(groups, x.shape[layout.channel_axis])
    return table.index_add(0, group, _example_sums(x, layout))


def per_example(table: torch.Tensor, group: torch.Tensor | None, layout: Layout) -> torch.Tensor:
    """Row ``group[i]`` of the ``(groups, C)`` ``table`` for each example ``i``, broadcastable
    against the input (``(N, C, 1, 1)`` for ``conv``, ``(N, 1, C)`` for ``seq``); with one
    group (``group`` ``None``), its row as a per-channel ``(1, C, 1, 1)``."""
    shape = layout.channel_shape(table.shape[1])
    if group is None:
        return table.reshape(shape)
    rows = table[group]
    return rows.reshape(rows.shape[0], *shape[1:])


class GroupBatchNormFunction(torch.autograd.Function):
    """Batch norm of groups of examples with the groups' statistics given, and a hand-derived
    backward: ghost batch norm's virtual batches, and batch renorm's one group.

    Forward, per group and channel, with the group's biased ``mean`` and
    ``invstd = 1 / sqrt(var + eps)`` (``(groups, C)`` tables computed by the caller without
    autograd) and per-channel ``weight`` and ``bias``::

        y = s x + t,   s = weight * invstd,   t = bias - mean * s      one multiply-add

    Backward: batch norm's (``batchnorm``'s ``BatchNormFunction``) per group. With
    ``x_hat = (x - mean) invstd``, ``g = dL/dy`` and ``m`` values per channel in the group::

        dL/dx      = s / m (m g - sum g - x_hat sum g x_hat)   = a g + b x + c per group
        dL/dweight = sum g x_hat,  dL/dbias = sum g             summed over the groups

    It differentiates through the group's mean and variance, which is why the caller may pass
    them detached. Only the input is kept for the backward, as batch norm keeps it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        group: torch.Tensor | None,
        counts: torch.Tensor,
        layout: Layout,
    ) -> torch.Tensor:
        values = upcast(x)
        scale = invstd if weight is None else invstd * weight.to(values.dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(values.dtype)
        y = multiply_add(
            values, per_example(scale, group, layout), per_example(shift, group, layout)
        )
        ctx.save_for_backward(x, mean, invstd, scale, group, counts)
        ctx.layout = layout
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, invstd, scale, group, counts = ctx.saved_tensors
        layout, groups = ctx.layout, mean.shape[0]
        values, g = upcast(x), upcast(grad)
        sum_g = group_sums(g, group, groups, layout)
        sum_g_xhat = invstd * (group_sums(g * values, group, groups, layout) - mean * sum_g)
        b = -scale * invstd * sum_g_xhat / counts
        c = -scale * sum_g / counts - b * mean
        grad_x = multiply_add(
            values,
            per_example(b, group, layout),
            multiply_add(g, per_example(scale, group, layout), per_example(c, group, layout)),
        ).to(x.dtype)
        grad_weight = sum_g_xhat.sum(dim=0) if ctx.needs_input_grad[1] else None
        grad_bias = sum_g.sum(dim=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None
