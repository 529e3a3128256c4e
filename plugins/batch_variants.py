"""Batch norm with less (or no) dependence on the batch: Batch Renormalization
(``batchrenorm``), Ghost batch norm (``ghostbn``) and frozen batch norm (``frozenbn``).

All three keep batch norm's running statistics (``running_mean``, ``running_var``, with torch's
momentum convention and the unbiased variance) and its eval transform, and differ in train mode:

``batchrenorm``
    Batch norm's train-mode output depends on the batch's mean and variance, its eval output on
    the running ones; with small or non-i.i.d. batches the two differ and the network learns on
    one and is tested on the other. Batch Renormalization (Ioffe 2017, Algorithm 1) corrects the
    batch-normalized value by how far the batch is from the running statistics,
    ``y = ((x - mu_B) / sigma_B) * r + d``, ``r`` and ``d`` clipped and held constant for the
    gradient, so the train-mode output is the eval-mode one whenever the clips are not reached.
``ghostbn``
    Normalizes small "virtual" batches cut from a large batch (Hoffer, Hubara & Soudry 2017),
    each with its own statistics: large-batch training keeps the noise (the regularization) of
    small-batch statistics.
``frozenbn``
    A batch norm whose statistics and affine are fixed data: fine-tuning a pretrained network
    with small batches (detection, segmentation) without letting those batches move it. Equal
    to ``torchvision.ops.FrozenBatchNorm2d`` in every layout, and ``normzoo.convert(model,
    "frozenbn")`` freezes a trained model's batch norms (:meth:`FrozenBatchNorm.carry_over`).

float16 and bfloat16 inputs are normalized in float32 and cast back, as ``batchnorm`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from normzoo import distributed
from normzoo.base import AffineNorm, NormBase
from normzoo.errors import BatchSizeError
from normzoo.hookspecs import hookimpl
from normzoo.interface import (
    AFFINE,
    EPS,
    MOMENTUM,
    SYNC,
    NormInfo,
    Option,
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

RENORM = "batchrenorm"
GHOST = "ghostbn"
FROZEN = "frozenbn"


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


# -- groups of examples: ghost batch norm's virtual batches, batch renorm's one batch ------------


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


# -- Batch Renormalization ---------------------------------------------------------------------


class BatchRenorm(NormBase):
    """Batch Renormalization (Ioffe 2017, Algorithm 1); statistics in registered buffers.

    Train mode, per channel over the ``m`` values it has in the batch (over every process's
    share with ``sync`` under torch.distributed, as ``batchnorm``)::

        mu_B, var_B = E[x], E[(x - mu_B)^2]           biased: the batch's own spread
        sigma_B     = sqrt(var_B + eps)
        sigma       = sqrt(running_var + eps)         the running statistics *before* this batch
        r = clip(sigma_B / sigma, 1/r_max, r_max)     no gradient (detached)
        d = clip((mu_B - running_mean) / sigma, -d_max, d_max)   no gradient
        y = gamma * (((x - mu_B) / sigma_B) * r + d) + beta

    then the running statistics move exactly as ``batchnorm``'s (``momentum``, the unbiased
    batch variance into ``running_var``). Unclipped, ``r`` and ``d`` turn the batch-normalized
    value into ``(x - running_mean) / sigma``, the eval-mode value; the gradient still flows
    through ``mu_B`` and ``sigma_B`` as in batch norm. ``r_max = 1`` and ``d_max = 0`` give
    batch norm. Eval mode is batch norm's with the running statistics.

    Since ``r`` and ``d`` are constants for the gradient, the output is batch norm's with the
    affine ``gamma r`` and ``gamma d + beta``: :class:`GroupBatchNormFunction` with one group,
    whose backward is batch norm's. So the train-mode gradient is *not* the derivative of the
    forward (through ``r`` and ``d``, the output depends on the batch in a way the gradient
    ignores, by the algorithm's design), and a finite-difference check of it fails unless
    ``r`` and ``d`` are held fixed (the tests do so).

    Parameters
    ----------
    num_features, layout, eps, momentum, affine:
        As for :class:`~normzoo.NormBase`.
    r_max, d_max:
        The clips of ``r`` (>= 1) and ``d`` (>= 0).
    warmup:
        Training steps of plain batch norm (``r = 1``, ``d = 0``) before the corrections start:
        the running statistics must first be worth correcting towards. The paper's experiments
        (section 4) train with ``r_max = 1``, ``d_max = 0`` for the first 5,000 steps, then
        relax them gradually to ``r_max = 3`` at 40,000 steps and ``d_max = 5`` at 25,000
        steps; ``warmup`` gives the first phase, and the ramp is ``module.r_max`` and
        ``module.d_max`` set from the training loop (plain attributes, read at every step).
    sync:
        Statistics over the global batch under torch.distributed
        (:func:`~normzoo.stats.global_batch_moments`; autograd then differentiates across
        processes in place of the hand-written backward).

    A training step is a train-mode forward with autograd recording; ``num_train_steps``
    counts them. A forward under ``torch.no_grad()`` (the harness re-estimating the running
    statistics before each test, ``--precise-examples``) is no step. The counter is its own
    buffer, not ``num_batches_tracked``: that one restarts whenever the running statistics are
    reset (which the re-estimation does before every test), and would restart the warmup.

    State-dict version 3 (``NormBase``'s is 2) adds ``num_train_steps``. A state dict without
    it, of version 2 or older (``batchnorm``'s and torch's batch norms', which have the other
    buffers under the same names), loads with the counter at its ``num_batches_tracked``: a
    batch norm trained that many steps is past its warmup as far.
    """

    _version = 3

    def __init__(
        self,
        num_features: int,
        layout: str,
        eps: float,
        momentum: float | None,
        r_max: float,
        d_max: float,
        warmup: int,
        affine: bool,
        sync: bool,
    ) -> None:
        super().__init__(num_features, layout, eps, momentum, affine)
        self.r_max = r_max
        self.d_max = d_max
        self.warmup = warmup
        self.sync = sync
        self.register_running_stat("running_mean", partial(torch.zeros, num_features))
        self.register_running_stat("running_var", partial(torch.ones, num_features))
        self.register_buffer("num_train_steps", torch.tensor(0, dtype=torch.long))

    def reset_parameters(self) -> None:
        """Parameters and running statistics back to their initial values, and the step count
        to 0: a fresh layer warms up again (:meth:`reset_running_stats` alone keeps it)."""
        super().reset_parameters()
        if hasattr(self, "num_train_steps"):  # not yet while __init__ runs
            self.num_train_steps.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, RENORM)
        layout = self.layout_spec
        if not self.training:
            return running_normalize(
                x, layout, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        values = upcast(x)
        synced = distributed.active(self.sync)
        if synced:
            mean, var, count = global_batch_moments(x, layout)
            check_batch_size(x, RENORM, self.layout, values=float(count))
        else:
            check_batch_size(x, RENORM, self.layout)
            with torch.no_grad():  # the function's backward differentiates through them
                mean, var = batch_moments(values, layout)
            count = layout.values_per_channel(x)
        mean, var = mean.reshape(1, -1), var.reshape(1, -1)  # one group of every example
        invstd = torch.rsqrt(var + self.eps)
        r, d = self._corrections(mean.detach(), invstd.detach())
        weight, bias = (r, d) if self.weight is None else (self.weight * r, self.weight * d)
        if self.bias is not None:
            bias = bias + self.bias
        if synced:  # autograd, across processes
            scale = invstd * weight
            y = multiply_add(
                values,
                per_example(scale, None, layout),
                per_example(bias - mean * scale, None, layout),
            ).to(x.dtype)
        else:
            counts = torch.full((1, 1), float(count), dtype=values.dtype, device=values.device)
            y = GroupBatchNormFunction.apply(
                x, weight.reshape(-1), bias.reshape(-1), mean, invstd, None, counts, layout
            )
        self.update_running_stats(
            running_mean=mean.detach().reshape(-1),
            running_var=unbiased(var.detach(), count).reshape(-1),
        )
        if torch.is_grad_enabled():
            self.num_train_steps.add_(1)
        return y

    @torch.no_grad()
    def _corrections(
        self, mean: torch.Tensor, invstd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``r`` and ``d`` of this batch against the running statistics as they are (1 and 0
        during the warmup), shaped like ``mean``."""
        if self.warmup and int(self.num_train_steps) < self.warmup:
            return torch.ones_like(invstd), torch.zeros_like(mean)
        running_invstd = torch.rsqrt(self.running_var.to(invstd.dtype) + self.eps)
        running_invstd = running_invstd.reshape(invstd.shape)
        r = (running_invstd / invstd).clamp(1.0 / self.r_max, self.r_max)  # sigma_B / sigma
        d = (mean - self.running_mean.to(mean.dtype).reshape(mean.shape)) * running_invstd
        return r, d.clamp(-self.d_max, self.d_max)

    def upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        """Version 2 and older (a batch norm's state dict): the step counter starts at
        ``num_batches_tracked``."""
        super().upgrade_state_dict(state_dict, prefix, version)
        key = prefix + "num_train_steps"
        if key not in state_dict:
            state_dict[key] = state_dict[prefix + "num_batches_tracked"].clone()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup={self.warmup}"
        )


# -- Ghost batch norm --------------------------------------------------------------------------


class GhostBatchNorm(NormBase):
    """Ghost batch norm (Hoffer, Hubara & Soudry 2017): batch norm of each virtual batch.

    In train mode the batch is split along ``N`` into virtual batches of
    ``virtual_batch_size`` examples, in order (the last may be smaller, as ``torch.split``
    cuts), and each is batch-normalized with its own mean and biased variance over its values
    per channel (:class:`GroupBatchNormFunction`). The running statistics are then updated once
    per virtual batch, in order, each update counted in ``num_batches_tracked``: exactly what
    torch's batch norm called on each virtual batch in turn leaves (so with ``momentum`` 0.1
    and 8 virtual batches, one step moves them as 8 batch-norm steps would). A batch of at
    most ``virtual_batch_size`` examples is one virtual batch: plain batch norm. Eval mode is
    batch norm's with the running statistics.

    A virtual batch with a single value per channel (a last one of one example in the ``fc``
    layout) has no variance: it is refused with :class:`~normzoo.BatchSizeError`, as torch's
    batch norm refuses it.

    Parameters
    ----------
    num_features, layout, eps, momentum, affine:
        As for :class:`~normzoo.NormBase`.
    virtual_batch_size:
        Examples per virtual batch, >= 2 (one example per virtual batch would normalize each
        example on its own: instance norm on images, nothing at all in ``fc``).
    sync:
        Under torch.distributed with several processes, the virtual batches are cut from the
        *global* batch, the processes' shares side by side in rank order, exactly as one
        process holding the whole batch would cut it: a virtual batch that straddles two
        shares is normalized with the statistics of all its examples (one collective per layer
        sums every virtual batch's sums and sums of squares, in float64, after one that
        places the shares; autograd differentiates across processes), and every process
        updates its running statistics with every virtual batch, so they stay equal
        everywhere. When each share is a multiple of ``virtual_batch_size``, no virtual batch
        straddles and each process normalizes its own examples as it would alone; only the
        running statistics see the others'. With ``sync=False`` each process cuts its own
        share and keeps its own running statistics.

    State-dict version 2, ``NormBase``'s: the buffers are ``batchnorm``'s, under the same names,
    so state dicts move between the two.
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        layout: str,
        virtual_batch_size: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        sync: bool,
    ) -> None:
        super().__init__(num_features, layout, eps, momentum, affine)
        self.virtual_batch_size = virtual_batch_size
        self.sync = sync
        self.register_running_stat("running_mean", partial(torch.zeros, num_features))
        self.register_running_stat("running_var", partial(torch.ones, num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, GHOST)
        layout = self.layout_spec
        if not self.training:
            return running_normalize(
                x, layout, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        values = upcast(x)
        if distributed.active(self.sync):
            y, mean, var, counts = self._global_forward(values)
        else:
            check_batch_size(x, GHOST, self.layout)
            group, counts = self._virtual_batches(values, 0, values.shape[0])
            with torch.no_grad():  # the function's backward differentiates through them
                sums = group_sums(values, group, len(counts), layout)
                mean = sums / counts
                centered = values - per_example(mean, group, layout)
                var = group_sums(centered.square_(), group, len(counts), layout) / counts
            y = GroupBatchNormFunction.apply(
                x, self.weight, self.bias, mean, torch.rsqrt(var + self.eps), group, counts,
                layout,
            )  # fmt: skip
        for k in range(len(counts)):  # torch's batch norm on each virtual batch in turn
            self.update_running_stats(
                running_mean=mean[k].detach(), running_var=unbiased(var[k].detach(), counts[k])
            )
        return y.to(x.dtype)

    def _values_per_example(self, values: torch.Tensor) -> int:
        """How many values each channel has in one example (``H * W`` for ``conv``, 1 for
        ``fc``), also for an empty share."""
        channel_axis = self.layout_spec.channel_axis
        return math.prod(n for d, n in enumerate(values.shape) if d not in (0, channel_axis))

    def _virtual_batches(
        self, values: torch.Tensor, start: int, total: int
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The virtual batch of each of this process's examples (examples ``start`` to
        ``start + N`` of a batch of ``total``; ``None`` when there is one virtual batch), and
        each virtual batch's number of values per channel, a ``(K, 1)`` column;
        :class:`BatchSizeError` for a virtual batch of one value per channel."""
        size = self.virtual_batch_size
        examples = [min(size, total - begin) for begin in range(0, total, size)]
        per_example = self._values_per_example(values)
        if examples[-1] * per_example < 2:
            raise BatchSizeError(
                f"{GHOST} cuts the batch of {total} examples into virtual batches of {size}; "
                f"the last, of {examples[-1]}, has 1 value per channel and no variance; use a "
                "batch size that leaves at least 2 examples in it, or call .eval()"
            )
        group = None
        if len(examples) > 1:
            group = torch.arange(start, start + values.shape[0], device=values.device) // size
        counts = torch.tensor(examples, dtype=values.dtype, device=values.device) * per_example
        return group, counts.unsqueeze(1)

    def _global_forward(
        self, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The output, and each virtual batch's mean, biased variance and count, for virtual
        batches cut from the global batch: the shares' sizes first (to place this one), then
        one collective of every virtual batch's sums and sums of squares in float64, whose
        gradient crosses processes."""
        layout = self.layout_spec
        rank = dist.get_rank()
        mine = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=values.device)
        mine[rank] = values.shape[0]
        (sizes,) = distributed.sum_over_processes(mine)
        start, total = int(sizes[:rank].sum()), int(sizes.sum())
        everywhere = float(total * self._values_per_example(values))
        check_batch_size(values, GHOST, self.layout, values=everywhere)
        group, counts = self._virtual_batches(values, start, total)
        wide = values.to(torch.float64)
        sums, squares = distributed.sum_over_processes(
            group_sums(wide, group, len(counts), layout),
            group_sums(wide * wide, group, len(counts), layout),
        )
        mean = sums / counts.to(torch.float64)
        var = (squares / counts.to(torch.float64) - mean * mean).clamp_min(0.0)
        mean, var = mean.to(values.dtype), var.to(values.dtype)
        y = (values - per_example(mean, group, layout)) * per_example(
            torch.rsqrt(var + self.eps), group, layout
        )
        return self.affine_transform(y), mean, var, counts

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


# -- frozen batch norm -------------------------------------------------------------------------


class FrozenBatchNorm(AffineNorm):
    """Batch norm with fixed statistics and a fixed affine, in both modes:
    ``torchvision.ops.FrozenBatchNorm2d`` in every layout.

    ``y = x * s + t`` per channel with ``s = weight / sqrt(running_var + eps)`` and
    ``t = bias - running_mean * s``, in ``train()`` as in ``eval()``; nothing is learned and
    nothing is updated. ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers
    under torchvision's names (initially 1, 0, 0, 1: a fresh layer divides by
    ``sqrt(1 + eps)``), so torchvision's state dicts load, and so do batch norms' (their
    ``num_batches_tracked`` is dropped, as torchvision drops it). ``eps`` defaults to
    torchvision's 1e-5.

    It is no :class:`~normzoo.NormBase`: with no running averages there is nothing to
    re-estimate, and the harness's re-estimation (which resets running statistics first) must
    not touch frozen ones. ``affine`` is ``False`` in :class:`~normzoo.AffineNorm`'s sense
    (nothing learned): the affine is data, like the statistics.

    State-dict version 1: the four buffers above.
    """

    _version = 1

    def __init__(self, num_features: int, layout: str, eps: float) -> None:
        super().__init__(num_features, layout, eps, affine=False)
        del self.weight, self.bias  # AffineNorm's absent learned affine; here it is buffers
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def reset_parameters(self) -> None:
        """Nothing to reset: the affine and the statistics are frozen data (set by
        ``load_state_dict`` or :func:`normzoo.convert`), and a model-wide re-initialization
        must not turn them back into an untrained layer's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, FROZEN)
        return running_normalize(
            x, self.layout_spec, self.running_mean, self.running_var, self.weight, self.bias,
            self.eps,
        )  # fmt: skip

    @torch.no_grad()
    def carry_over(self, old: nn.Module) -> list[str]:
        """Take the affine and the running statistics of the layer ``old`` this one replaces
        (:func:`normzoo.convert` calls it); return the names of what ``old`` lacks.

        The affine may be parameters or buffers (a frozen layer's); none at all (a batch norm
        without affine) is the identity, 1 and 0, which a fresh layer holds already. Missing
        running statistics (a group norm, a batch norm with ``track_running_stats=False``)
        would freeze this layer at mean 0 and variance 1: reported. ``num_batches_tracked``
        has no meaning once the statistics stop moving, and is not taken.
        """
        missing = []
        for name in ("weight", "bias", "running_mean", "running_var"):
            value, target = getattr(old, name, None), getattr(self, name)
            if isinstance(value, torch.Tensor) and value.shape == target.shape:
                target.copy_(value)
            elif value is not None or name.startswith("running_"):
                missing.append(name)
        return missing

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a batch norm's, as torchvision
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, layout={self.layout!r}, eps={self.eps}"


# -- registration ------------------------------------------------------------------------------

R_MAX = Option(
    "r_max", float, 3.0, "r = sigma_B / sigma is clipped to [1/r_max, r_max]; 1: no rescaling",
    1.0,
)  # fmt: skip
D_MAX = Option(
    "d_max", float, 5.0, "d = (mu_B - mu) / sigma is clipped to [-d_max, d_max]; 0: no shift",
    0.0,
)  # fmt: skip
WARMUP = Option(
    "warmup", int, 0, "training steps of plain batch norm (r = 1, d = 0) before the "
    "corrections start", 0,
)  # fmt: skip
VIRTUAL_BATCH_SIZE = Option(
    "virtual_batch_size", int, 32, "examples per virtual batch (the last may be smaller)", 2
)
GHOST_SYNC = replace(
    SYNC, help="virtual batches cut from the global batch (the shares in rank order) under "
    "torch.distributed",
)  # fmt: skip


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=RENORM,
            summary="batch renormalization: batch norm corrected towards the running statistics",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=BatchRenorm,
            options=(EPS, MOMENTUM, R_MAX, D_MAX, WARMUP, AFFINE, SYNC),
            reference="Ioffe, Batch Renormalization: Towards Reducing Minibatch Dependence in "
            "Batch-Normalized Models, NeurIPS 2017, Algorithm 1",
            exact_train_gradient=False,  # r and d are constants in the backward, by design
        )
    )
    register(
        NormInfo(
            name=GHOST,
            summary="ghost batch norm: batch norm of each virtual batch of the batch",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=GhostBatchNorm,
            options=(VIRTUAL_BATCH_SIZE, EPS, MOMENTUM, AFFINE, GHOST_SYNC),
            reference="Hoffer, Hubara & Soudry, Train longer, generalize better: closing the "
            "generalization gap in large batch training of neural networks, NeurIPS 2017 "
            "(Ghost Batch Normalization)",
        )
    )
    register(
        NormInfo(
            name=FROZEN,
            summary="frozen batch norm: fixed statistics and affine (torchvision's)",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=False,
            factory=FrozenBatchNorm,
            options=(EPS,),
            reference="torchvision.ops.FrozenBatchNorm2d (from Detectron); He, Zhang, Ren & "
            "Sun, Deep Residual Learning for Image Recognition, CVPR 2016 (batch norm frozen "
            "for detection fine-tuning, appendix A)",
        )
    )
