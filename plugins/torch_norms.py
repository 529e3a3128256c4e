"""torch's own normalization layers behind the normzoo interface, and the identity baseline.

``layernorm`` is ``nn.GroupNorm(1, C)``: one group normalizes each example over all of
``(C, H, W)`` (over ``C`` for ``fc``) and, unlike ``nn.LayerNorm((C, H, W))``, keeps one affine
pair per channel, so its parameter count does not depend on the image size.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normzoo.hookspecs import hookimpl
from normzoo.interface import NormInfo, Option
from normzoo_plugins.batchnorm import EPS, MOMENTUM


def torch_batchnorm(num_features: int, layout: str, eps: float, momentum: float) -> nn.Module:
    """``nn.BatchNorm1d`` for ``fc``, ``nn.BatchNorm2d`` for ``conv``."""
    cls = nn.BatchNorm1d if layout == "fc" else nn.BatchNorm2d
    return cls(num_features, eps=eps, momentum=momentum)


def layernorm(num_features: int, layout: str, eps: float) -> nn.Module:
    """Per-example normalization over every non-batch dimension, per-channel affine."""
    return nn.GroupNorm(1, num_features, eps=eps)


def identity(num_features: int, layout: str) -> nn.Module:
    """No normalization at all."""
    return nn.Identity()


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name="torch-batchnorm",
            summary="torch's nn.BatchNorm1d / nn.BatchNorm2d",
            layouts=("fc", "conv"),
            uses_batch_stats=True,
            factory=torch_batchnorm,
            options=(EPS, MOMENTUM),
            reference="Ioffe & Szegedy, Batch Normalization, ICML 2015",
        )
    )
    register(
        NormInfo(
            name="layernorm",
            summary="layer norm: each example over (C, H, W), per-channel affine",
            layouts=("fc", "conv"),
            uses_batch_stats=False,
            factory=layernorm,
            options=(Option("eps", float, 1e-5, "added to the variance", minimum=0.0),),
            reference="Ba, Kiros & Hinton, Layer Normalization, 2016; "
            "Wu & He, Group Normalization, ECCV 2018 (G = 1)",
        )
    )
    register(
        NormInfo(
            name="none",
            summary="identity: no normalization, the baseline",
            layouts=("fc", "conv"),
            uses_batch_stats=False,
            factory=identity,
            reference="LeCun et al., Gradient-based learning applied to document "
            "recognition, 1998 (LeNet without normalization)",
        )
    )
