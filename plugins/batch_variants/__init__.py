"""Batch norm with less (or no) dependence on the batch: Batch Renormalization
(``batchrenorm``), Ghost batch norm (``ghostbn``) and frozen batch norm (``frozenbn``).

All three keep batch norm's running statistics (``running_mean``, ``running_var``, with torch's
momentum convention and the unbiased variance) and its eval transform, and differ in train mode:
``batchrenorm`` corrects the batch statistics towards the running ones
(:mod:`~normzoo_plugins.batch_variants.batch_renorm`), ``ghostbn`` normalizes each small virtual
batch of a large batch on its own (:mod:`~normzoo_plugins.batch_variants.ghost_batchnorm`), and
``frozenbn`` keeps statistics and affine fixed, as torchvision's ``FrozenBatchNorm2d``
(:mod:`~normzoo_plugins.batch_variants.frozen_batchnorm`). float16 and bfloat16 inputs are
normalized in float32 and cast back, as ``batchnorm`` does.

One module per norm, in one package because they share code and a plugin imports nothing from
another plugin: all three use batch norm's eval transform
(:mod:`~normzoo_plugins.batch_variants.eval_transform`), ``batchrenorm`` and ``ghostbn`` the
batch norm of groups of examples with its hand-derived backward
(:mod:`~normzoo_plugins.batch_variants.example_groups`). This module registers the three, under
the entry point ``batch-variants``.
"""

from __future__ import annotations

from collections.abc import Callable

from normzoo.hookspecs import hookimpl
from normzoo.interface import AFFINE, EPS, MOMENTUM, SYNC, NormInfo
from normzoo.layouts import LAYOUT_NAMES
from normzoo_plugins.batch_variants.batch_renorm import D_MAX, R_MAX, RENORM, WARMUP, BatchRenorm
from normzoo_plugins.batch_variants.frozen_batchnorm import FROZEN, FrozenBatchNorm
from normzoo_plugins.batch_variants.ghost_batchnorm import (
    GHOST,
    GHOST_SYNC,
    VIRTUAL_BATCH_SIZE,
    GhostBatchNorm,
)

__all__ = ["BatchRenorm", "FrozenBatchNorm", "GhostBatchNorm", "normzoo_register_norms"]


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
