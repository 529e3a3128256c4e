"""Ghost batch norm (``ghostbn``; Hoffer, Hubara & Soudry 2017).

Normalizes small "virtual" batches cut from a large batch, each with its own statistics:
large-batch training keeps the noise (the regularization) of small-batch statistics.

float16 and bfloat16 inputs are normalized in float32 and cast back, as ``batchnorm`` does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist

from normzoo import distributed
from normzoo.base import NormBase
from normzoo.errors import BatchSizeError
from normzoo.interface import SYNC, Option, check_batch_size, check_input
from normzoo.stats import unbiased, upcast
from normzoo_plugins.batch_variants.eval_transform import running_normalize
from normzoo_plugins.batch_variants.example_groups import (
    GroupBatchNormFunction,
    group_sums,
    per_example,
)

GHOST = "ghostbn"

VIRTUAL_BATCH_SIZE = Option(
    "virtual_batch_size", int, 32, "examples per virtual batch (the last may be smaller)", 2
)
GHOST_SYNC = replace(
    SYNC, help="virtual batches cut from the global batch (the shares in rank order) under "
    "torch.distributed",
)  # fmt: skip


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
