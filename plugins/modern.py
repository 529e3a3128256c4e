"""Norms that other libraries or the papers' own code ship, each equal to that code.

``dyt``
    Dynamic Tanh (Zhu et al. 2025): ``y = weight * tanh(alpha * x) + bias``, no statistics at
    all; the authors' ``DynamicTanh`` (github.com/jiachenzhu/DyT, ``dynamic_tanh.py``).
``frn``
    Filter Response Normalization with the thresholded linear unit (Singh & Krishnan 2020):
    each channel of each example divided by its root mean square over the positions, then
    ``max(weight * y + bias, tau)``; timm's ``FilterResponseNormTlu2d``.
``evonorm-b0``
    EvoNorm-B0 (Liu et al. 2020): ``x / max(sqrt(var_batch + eps), v * x + std_instance)``;
    timm's ``EvoNorm2dB0``, with its running variance.
``evonorm-s0``
    EvoNorm-S0: ``x * sigmoid(v * x) / std_group``, per example; timm's ``EvoNorm2dS0``.
``switchnorm``
    Switchable Normalization (Luo et al. 2019): learned softmax mixtures of the instance, layer
    and batch means and variances; the authors' ``SwitchNorm2d``
    (github.com/switchablenorms/Switchable-Normalization, ``devkit/ops/switchable_norm.py``).

Parameter and buffer names, and where possible shapes, are the reference's, so its state dict
loads. Each module normalizes float16/bfloat16 input in float32 and casts the output back.
Where the reference is written for ``(N, C, H, W)`` only, the other conv layouts (``conv1d``,
``conv3d``) reduce over all their positions as it reduces over ``H, W``; the layouts declared
are those where the formula means something: FRN, EvoNorm-B0 and Switchable Normalization take
statistics of one channel of one example over its positions, which ``fc`` does not have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from normzoo.base import AffineNorm, NormBase
from normzoo.errors import LayoutError, OptionError
from normzoo.hookspecs import hookimpl
from normzoo.interface import EPS, MOMENTUM, NormInfo, Option, check_batch_size, check_input
from normzoo.layouts import LAYOUT_NAMES, Layout
from normzoo.stats import batch_moments, unbiased, upcast

NAME_DYT, NAME_FRN, NAME_B0, NAME_S0, NAME_SN = (
    "dyt", "frn", "evonorm-b0", "evonorm-s0", "switchnorm",
)  # fmt: skip
#: Where statistics of one channel of one example over its positions exist.
CONV_LAYOUTS = ("conv1d", "conv", "conv3d")


def _per_channel(vector: torch.Tensor, layout: Layout, like: torch.Tensor) -> torch.Tensor:
    """``vector`` (one value per channel) in ``like``'s dtype, broadcastable against it."""
    return vector.to(like.dtype).reshape(layout.channel_shape(vector.shape[0]))


class DynamicTanh(AffineNorm):
    """``weight * tanh(alpha * x) + bias``: a scalar learned ``alpha`` squashes the extreme
    values as layer norm does in transformers, without computing any statistic.

    ``alpha`` has shape ``(1,)`` as in the authors' class, so their state dict loads. DyT has
    no ``eps``; the one :class:`~normzoo.base.AffineNorm` stores is unused.
    """

    def __init__(self, num_features: int, layout: str, alpha_init: float) -> None:
        self.alpha_init = alpha_init
        super().__init__(num_features, layout)
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))

    def reset_parameters(self) -> None:
        """``weight`` 1, ``bias`` 0 and ``alpha`` back to ``alpha_init``."""
        super().reset_parameters()
        if "alpha" in self._parameters:  # not yet while AffineNorm.__init__ runs
            nn.init.constant_(self.alpha, self.alpha_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_DYT)
        values = upcast(x)
        squashed = torch.tanh(self.alpha.to(values.dtype) * values)
        return self.affine_transform(squashed).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, layout={self.layout!r}, alpha_init={self.alpha_init}"


class FilterResponseNorm(AffineNorm):
    """Each channel of each example divided by its root mean square over the positions (no
    centring), the per-channel affine, then the thresholded linear unit ``max(y, tau)``.

    Without the mean, ``y`` has no reason to be centred: ``tau`` (learned, init 0) is the
    activation's threshold that makes up for it. ``tlu=False`` leaves the TLU out, as timm's
    ``apply_act=False`` does (no ``tau`` parameter then).
    """

    def __init__(self, num_features: int, layout: str, tlu: bool, eps: float) -> None:
        super().__init__(num_features, layout, eps)
        self.tlu = tlu
        if tlu:
            self.tau: nn.Parameter | None = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("tau", None)

    def reset_parameters(self) -> None:
        """``weight`` 1, ``bias`` 0 and ``tau`` 0."""
        super().reset_parameters()
        if self._parameters.get("tau") is not None:  # not yet while AffineNorm.__init__ runs
            nn.init.zeros_(self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_FRN)
        layout = self.layout_spec
        values = upcast(x)
        nu2 = values.square().mean(dim=layout.spatial_dims, keepdim=True)
        y = self.affine_transform(values * torch.rsqrt(nu2 + self.eps))
        if self.tau is not None:
            y = torch.maximum(y, _per_channel(self.tau, layout, y))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tlu={self.tlu}"


class EvoNormB0(NormBase):
    """EvoNorm-B0: ``x / max(sqrt(var + eps), v * x + sqrt(var_instance + eps))``, then the
    per-channel affine.

    ``var`` is the biased batch variance per channel in training and ``running_var`` in eval;
    ``var_instance`` is each example's own (biased) variance per channel over its positions.
    The running variance averages the unbiased batch variance with ``momentum`` in torch's
    convention, as timm's class and ``batchnorm`` do, and starts at 1.
    """

    def __init__(self, num_features: int, layout: str, eps: float, momentum: float | None) -> None:
        super().__init__(num_features, layout, eps, momentum)
        self.v = nn.Parameter(torch.ones(num_features))
        self.register_running_stat("running_var", partial(torch.ones, num_features))

    def reset_parameters(self) -> None:
        """``weight`` 1, ``bias`` 0, ``v`` 1 and the running statistics."""
        super().reset_parameters()
        if "v" in self._parameters:  # not yet while NormBase.__init__ runs
            nn.init.ones_(self.v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_B0)
        layout = self.layout_spec
        values = upcast(x)
        if self.training:
            check_batch_size(x, NAME_B0, self.layout)
            _, var = batch_moments(values, layout)
            count = layout.values_per_channel(x)
            self.update_running_stats(running_var=unbiased(var, count).reshape(-1))
        else:
            var = _per_channel(self.running_var, layout, values)
        left = torch.sqrt(var + self.eps)
        instance_var = values.var(dim=layout.spatial_dims, correction=0, keepdim=True)
        right = values * _per_channel(self.v, layout, values) + torch.sqrt(instance_var + self.eps)
        return self.affine_transform(values / torch.maximum(left, right)).to(x.dtype)


class EvoNormS0(AffineNorm):
    """EvoNorm-S0: ``x * sigmoid(v * x) / sqrt(var_group + eps)``, then the per-channel affine.

    ``var_group`` is one example's biased variance over a group of ``num_features / groups``
    consecutive channels and all positions, as group norm's; on ``seq`` each token is an
    example, as for ``groupnorm``. No batch statistics: train and eval are the same function.
    """

    def __init__(
        self, num_features: int, layout: str, groups: int, group_size: int | None, eps: float
    ) -> None:
        super().__init__(num_features, layout, eps)
        self.groups = groups if group_size is None else num_features // group_size
        self.v = nn.Parameter(torch.ones(num_features))

    def reset_parameters(self) -> None:
        """``weight`` 1, ``bias`` 0 and ``v`` 1."""
        super().reset_parameters()
        if "v" in self._parameters:  # not yet while AffineNorm.__init__ runs
            nn.init.ones_(self.v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_S0)
        values = upcast(x)
        v = _per_channel(self.v, self.layout_spec, values)
        y = values * torch.sigmoid(values * v) / self._group_std(values)
        return self.affine_transform(y).to(x.dtype)

    def _group_std(self, x: torch.Tensor) -> torch.Tensor:
        """``sqrt(var_group + eps)`` per example (per token on ``seq``) and group, broadcastable
        against ``x``."""
        size = self.num_features // self.groups
        if self.layout_spec.channel_axis == x.dim() - 1:  # fc, seq: the channels are last
            grouped = x.reshape(*x.shape[:-1], self.groups, size)
            std = torch.sqrt(grouped.var(dim=-1, correction=0, keepdim=True) + self.eps)
            return std.expand_as(grouped).reshape(x.shape)
        grouped = x.reshape(x.shape[0], self.groups, -1)
        std = torch.sqrt(grouped.var(dim=-1, correction=0, keepdim=True) + self.eps)
        per_channel = std.expand(-1, -1, size).reshape(x.shape[0], self.num_features)
        return per_channel.reshape(*per_channel.shape, *[1] * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"


class SwitchNorm(NormBase):
    """Switchable Normalization: ``(x - mean) / sqrt(var + eps)`` with ``mean`` and ``var``
    softmax-weighted mixtures of the instance, layer and batch statistics, then the affine.

    The authors' arithmetic, kept exactly (see docs/norms/modern.md): the instance variance is
    the *unbiased* one over each example's positions; the layer and batch statistics are
    derived from the instance ones, ``var_ln = mean_c(var_in + mean_in^2) - mean_ln^2`` and
    ``var_bn`` likewise over the batch. In eval the batch terms are ``running_mean`` and
    ``running_var``, which start at 0 and average ``mean_bn`` and ``var_bn`` as they are (no
    Bessel correction on top). ``momentum`` is normzoo's (the new batch's weight): the authors'
    ``momentum=0.9`` is ``momentum=0.1`` here.

    ``using_bn=False`` drops the batch terms (two-way mixtures, no running statistics): then
    the norm is per example in training too. ``last_gamma`` starts ``weight`` at 0.
    """

    def __init__(
        self,
        num_features: int,
        layout: str,
        eps: float,
        momentum: float | None,
        using_bn: bool,
        last_gamma: bool,
    ) -> None:
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        super().__init__(num_features, layout, eps, momentum)
        terms = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(terms))
        self.var_weight = nn.Parameter(torch.ones(terms))
        if using_bn:
            self.register_running_stat("running_mean", partial(torch.zeros, num_features))
            self.register_running_stat("running_var", partial(torch.zeros, num_features))

    def reset_parameters(self) -> None:
        """``weight`` 1 (0 with ``last_gamma``), ``bias`` 0, equal mixture logits and running
        statistics 0."""
        super().reset_parameters()
        if self.last_gamma:
            nn.init.zeros_(self.weight)
        for name in ("mean_weight", "var_weight"):
            if name in self._parameters:  # not yet while NormBase.__init__ runs
                nn.init.ones_(self._parameters[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME_SN)
        values = upcast(x).reshape(x.shape[0], self.num_features, -1)
        if values.shape[-1] < 2:
            raise LayoutError(
                f"norm {NAME_SN!r} needs more than 1 value per channel in each example, got "
                f"input of shape {tuple(x.shape)} (layout {self.layout!r})"
            )
        mean_in = values.mean(-1, keepdim=True)
        var_in = values.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        second = var_in + mean_in**2
        var_ln = second.mean(1, keepdim=True) - mean_ln**2
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = second.mean(0, keepdim=True) - mean_bn**2
                self.update_running_stats(
                    running_mean=mean_bn.reshape(-1), running_var=var_bn.reshape(-1)
                )
            else:
                mean_bn = self.running_mean.to(values.dtype).reshape(1, -1, 1)
                var_bn = self.running_var.to(values.dtype).reshape(1, -1, 1)
            means.append(mean_bn)
            variances.append(var_bn)
        mean = _mixture(self.mean_weight.to(values.dtype), means)
        var = _mixture(self.var_weight.to(values.dtype), variances)
        y = ((values - mean) / (var + self.eps).sqrt()).reshape(x.shape)
        return self.affine_transform(y).to(x.dtype)

    def upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        """Also load the authors' ``SwitchNorm2d`` state dict (version 1, torch's default):
        its ``weight`` and ``bias`` are ``(1, C, 1, 1)`` and its running statistics
        ``(1, C, 1)``, normzoo's all ``(C,)``."""
        super().upgrade_state_dict(state_dict, prefix, version)
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.dim() > 1:
                state_dict[prefix + name] = value.reshape(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, using_bn={self.using_bn}, last_gamma={self.last_gamma}"


def _mixture(logits: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
    """``sum_k softmax(logits)_k * terms[k]``, added in the authors' order."""
    weights = torch.softmax(logits, 0)
    total = weights[0] * terms[0]
    for weight, term in zip(weights[1:], terms[1:], strict=True):
        total = total + weight * term
    return total


def check_evonorm_groups(options: Mapping[str, Any], num_features: int) -> None:
    """The groups must split the channels evenly: ``group_size`` (when given, it wins, as in
    timm) or else ``groups`` must divide ``num_features``."""
    key = "groups" if options["group_size"] is None else "group_size"
    if num_features % options[key]:
        divisors = [d for d in range(1, num_features + 1) if num_features % d == 0]
        raise OptionError(
            f"option {key!r} of norm {NAME_S0!r} must divide num_features={num_features}, got "
            f"{options[key]}; choose one of {', '.join(map(str, divisors))}"
        )


ALPHA_INIT = Option(
    "alpha_init", float, 0.5, "initial value of the learned scalar alpha in tanh(alpha * x)",
    0.0, exclusive_minimum=True,
)  # fmt: skip
TLU = Option("tlu", bool, True, "end with the thresholded linear unit max(y, tau), tau learned")
GROUPS = Option(
    "groups", int, 2, "number of channel groups (timm: 32); must divide the channel count", 1
)
GROUP_SIZE = Option(
    "group_size", int, None, "channels per group, instead of groups; must divide the channel "
    "count", 1, nullable=True,
)  # fmt: skip
USING_BN = Option("using_bn", bool, True, "mix in the batch statistics (false: instance, layer)")
#: The authors' ``momentum`` weights the old statistics; normzoo's the new batch, as torch's.
SWITCHNORM_MOMENTUM = replace(
    MOMENTUM, help="weight of the new batch in the running statistics (the authors' momentum "
    "0.9 is 0.1 here); none: cumulative average",
)  # fmt: skip
LAST_GAMMA = Option("last_gamma", bool, False, "start weight (gamma) at 0, for a residual branch")


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=NAME_DYT,
            summary="Dynamic Tanh: weight * tanh(alpha * x) + bias, no statistics",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=False,
            factory=DynamicTanh,
            options=(ALPHA_INIT,),
            reference="Zhu, Chen, He, LeCun & Liu, Transformers without Normalization, CVPR "
            "2025; github.com/jiachenzhu/DyT",
        )
    )
    register(
        NormInfo(
            name=NAME_FRN,
            summary="filter response norm: divide by the RMS over (H, W), then max(y, tau)",
            layouts=CONV_LAYOUTS,
            uses_batch_stats=False,
            factory=FilterResponseNorm,
            options=(TLU, replace(EPS, default=1e-6, help="added to the mean square nu^2")),
            reference="Singh & Krishnan, Filter Response Normalization Layer, CVPR 2020; "
            "timm's FilterResponseNormTlu2d",
        )
    )
    register(
        NormInfo(
            name=NAME_B0,
            summary="EvoNorm-B0: x / max(batch std, v * x + instance std), running variance",
            layouts=CONV_LAYOUTS,
            uses_batch_stats=True,
            factory=EvoNormB0,
            options=(replace(EPS, default=1e-3), MOMENTUM),
            reference="Liu, Brock, Simonyan & Le, Evolving Normalization-Activation Layers, "
            "NeurIPS 2020; timm's EvoNorm2dB0",
        )
    )
    register(
        NormInfo(
            name=NAME_S0,
            summary="EvoNorm-S0: x * sigmoid(v * x) / group std, per example",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=False,
            factory=EvoNormS0,
            options=(GROUPS, GROUP_SIZE, EPS),
            check=check_evonorm_groups,
            reference="Liu, Brock, Simonyan & Le, Evolving Normalization-Activation Layers, "
            "NeurIPS 2020; timm's EvoNorm2dS0",
        )
    )
    register(
        NormInfo(
            name=NAME_SN,
            summary="switchable norm: softmax mixtures of instance, layer and batch statistics",
            layouts=CONV_LAYOUTS,
            uses_batch_stats=True,
            factory=SwitchNorm,
            options=(EPS, SWITCHNORM_MOMENTUM, USING_BN, LAST_GAMMA),
            reference="Luo, Ren, Peng, Zhang & Li, Differentiable Learning-to-Normalize via "
            "Switchable Normalization, ICLR 2019; github.com/switchablenorms/"
            "Switchable-Normalization",
        )
    )
