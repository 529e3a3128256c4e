"""torch's own normalizations behind the normzoo interface, every layout, and the identity.

``torch-batchnorm``
    torch's batch norm (``nn.BatchNorm1d/2d/3d``'s common class), channels-last ``seq`` input
    moved to channels-first and back. Its state dict is that of ``nn.BatchNorm2d``.
``layernorm``
    one example normalized over every non-batch dimension, ``(C, H, W)`` for ``conv``, with a
    per-channel affine (``nn.GroupNorm(1, C)``), so the parameter count does not depend on the
    image size; on ``seq`` each token over its ``C`` channels, which is ``nn.LayerNorm(C)``.
``groupnorm``
    the channels split into ``groups`` groups, each normalized per example over its channels and
    the spatial dimensions (``nn.GroupNorm``); on ``seq`` per token. ``groups=1`` is
    ``layernorm``; ``groups=C`` on images is instance norm with an affine.
``instancenorm``
    each channel of each example over its spatial dimensions (``nn.InstanceNorm*d`` with
    ``affine=True``); on ``seq`` each channel over the sequence. No ``fc`` layout: a channel
    of one example is a single value there.
``rmsnorm``
    each example divided by its root mean square over the same dimensions as ``layernorm``,
    no centring, a per-channel scale and no shift (Zhang & Sennrich 2019; ``nn.RMSNorm``).
``none``
    the identity, with the input check every norm makes.

The stateless norms normalize float16/bfloat16 input in float32 and cast the output back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from normzoo.base import AffineNorm
from normzoo.errors import LayoutError, OptionError
from normzoo.hookspecs import hookimpl
from normzoo.interface import (
    AFFINE,
    EPS,
    MOMENTUM,
    NormInfo,
    Option,
    check_batch_size,
    check_input,
)
from normzoo.layouts import LAYOUT_NAMES, get_layout
from normzoo.stats import upcast


class TorchBatchNorm(_BatchNorm):
    """torch's batch norm for any layout; ``seq`` input is transposed to ``(N, C, L)``."""

    def __init__(
        self, num_features: int, layout: str, eps: float, momentum: float | None, affine: bool
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_BN)
        if self.training:
            check_batch_size(x, NAME_BN, self.layout)
        layout = get_layout(self.layout)
        if not layout.channels_last:
            return super().forward(x)
        return layout.from_channels_first(super().forward(layout.to_channels_first(x)))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """Already checked against the layout in :meth:`forward`."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}"


class GroupNorm(AffineNorm):
    """Per-example normalization over groups of channels (and the spatial dimensions).

    ``groups=1`` is layer norm. On ``seq`` each token is an example, so the statistics run over
    the channels of a group only, as ``nn.LayerNorm(C)`` does for ``groups=1``.
    """

    def __init__(
        self, num_features: int, layout: str, groups: int, eps: float, affine: bool,
        name: str = "groupnorm",
    ) -> None:  # fmt: skip
        super().__init__(num_features, layout, eps, affine)
        self.groups = groups
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, self.name)
        xc = upcast(x)
        weight = None if self.weight is None else self.weight.to(xc.dtype)
        bias = None if self.bias is None else self.bias.to(xc.dtype)
        if self.layout_spec.channels_last:
            tokens = xc.reshape(-1, self.num_features)
            y = F.group_norm(tokens, self.groups, weight, bias, self.eps).reshape(x.shape)
        else:
            y = F.group_norm(xc, self.groups, weight, bias, self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"


class InstanceNorm(AffineNorm):
    """Each channel of each example over its spatial dimensions (``L`` for ``seq``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_IN)
        layout = self.layout_spec
        spatial = 1
        for dim in layout.spatial_dims:
            spatial *= x.shape[dim]
        if spatial < 2:
            raise LayoutError(
                f"norm {NAME_IN!r} needs more than 1 value per channel in each example, got "
                f"input of shape {tuple(x.shape)} (layout {self.layout!r})"
            )
        xc = layout.to_channels_first(upcast(x))
        y = F.instance_norm(xc, eps=self.eps)
        return self.affine_transform(layout.from_channels_first(y)).to(x.dtype)


class RMSNorm(AffineNorm):
    """``x / sqrt(mean(x^2) + eps) * weight``, the mean over one example (one token on ``seq``)."""

    def __init__(self, num_features: int, layout: str, eps: float, affine: bool) -> None:
        super().__init__(num_features, layout, eps, affine, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_RMS)
        xc = upcast(x)
        mean_square = xc.square().mean(dim=self.layout_spec.example_dims, keepdim=True)
        return self.affine_transform(xc * torch.rsqrt(mean_square + self.eps)).to(x.dtype)


class Identity(nn.Module):
    """No normalization; checks the input like every other norm."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.num_features = num_features
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, "none")
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, layout={self.layout!r}"


NAME_BN, NAME_IN, NAME_RMS = "torch-batchnorm", "instancenorm", "rmsnorm"


def layernorm(num_features: int, layout: str, eps: float, affine: bool) -> GroupNorm:
    """Group norm with one group: each example over all its values (one token on ``seq``)."""
    return GroupNorm(num_features, layout, 1, eps, affine, name="layernorm")


def groupnorm(num_features: int, layout: str, groups: int, eps: float, affine: bool) -> GroupNorm:
    return GroupNorm(num_features, layout, groups, eps, affine)


def check_groups(options: Mapping[str, Any], num_features: int) -> None:
    """``groups`` must divide ``num_features``: each group gets ``C / groups`` channels."""
    groups = options["groups"]
    if num_features % groups:
        divisors = [d for d in range(1, num_features + 1) if num_features % d == 0]
        raise OptionError(
            f"option 'groups' of norm 'groupnorm' must divide num_features={num_features}, got "
            f"{groups}; choose one of {', '.join(map(str, divisors))}"
        )


GROUPS = Option("groups", int, 2, "number of channel groups; must divide the channel count", 1)


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=NAME_BN,
            summary="torch's batch norm (nn.BatchNorm1d/2d/3d)",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=TorchBatchNorm,
            options=(EPS, MOMENTUM, AFFINE),
            reference="Ioffe & Szegedy, Batch Normalization, ICML 2015",
        )
    )
    register(
        NormInfo(
            name="layernorm",
            summary="layer norm: each example over (C, H, W), per-channel affine",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=False,
            factory=layernorm,
            options=(EPS, AFFINE),
            reference="Ba, Kiros & Hinton, Layer Normalization, 2016; "
            "Wu & He, Group Normalization, ECCV 2018 (G = 1)",
        )
    )
    register(
        NormInfo(
            name="groupnorm",
            summary="group norm: each example over groups of channels (and H, W)",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=False,
            factory=groupnorm,
            options=(GROUPS, EPS, AFFINE),
            check=check_groups,
            reference="Wu & He, Group Normalization, ECCV 2018",
        )
    )
    register(
        NormInfo(
            name=NAME_IN,
            summary="instance norm: each channel of each example over (H, W)",
            layouts=("conv1d", "conv", "conv3d", "seq"),
            uses_batch_stats=False,
            factory=InstanceNorm,
            options=(EPS, AFFINE),
            reference="Ulyanov, Vedaldi & Lempitsky, Instance Normalization: The Missing "
            "Ingredient for Fast Stylization, 2016",
        )
    )
    register(
        NormInfo(
            name=NAME_RMS,
            summary="RMS norm: each example divided by its root mean square, per-channel scale",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=False,
            factory=RMSNorm,
            options=(EPS, AFFINE),
            reference="Zhang & Sennrich, Root Mean Square Layer Normalization, NeurIPS 2019",
        )
    )
    register(
        NormInfo(
            name="none",
            summary="identity: no normalization, the baseline",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=False,
            factory=Identity,
            reference="LeCun et al., Gradient-based learning applied to document "
            "recognition, 1998 (LeNet without normalization)",
        )
    )
