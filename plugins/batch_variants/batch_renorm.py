"""Batch Renormalization (``batchrenorm``; Ioffe 2017, Algorithm 1).

Batch norm's train-mode output depends on the batch's mean and variance, its eval output on the
running ones; with small or non-i.i.d. batches the two differ and the network learns on one and
is tested on the other. Batch Renormalization corrects the batch-normalized value by how far the
batch is from the running statistics, ``y = ((x - mu_B) / sigma_B) * r + d``, ``r`` and ``d``
clipped and held constant for the gradient, so the train-mode output is the eval-mode one
whenever the clips are not reached.

float16 and bfloat16 inputs are normalized in float32 and cast back, as ``batchnorm`` does.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from normzoo import distributed
from normzoo.base import NormBase
from normzoo.interface import Option, check_batch_size, check_input
from normzoo.stats import batch_moments, global_batch_moments, multiply_add, unbiased, upcast
from normzoo_plugins.batch_variants.eval_transform import running_normalize
from normzoo_plugins.batch_variants.example_groups import GroupBatchNormFunction, per_example

RENORM = "batchrenorm"

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
