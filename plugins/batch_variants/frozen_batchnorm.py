"""Frozen batch norm (``frozenbn``): a batch norm whose statistics and affine are fixed data.

Fine-tuning a pretrained network with small batches (detection, segmentation) without letting
those batches move it. Equal to ``torchvision.ops.FrozenBatchNorm2d`` in every layout, and
``normzoo.convert(model, "frozenbn")`` freezes a trained model's batch norms
(:meth:`FrozenBatchNorm.carry_over`).

float16 and bfloat16 inputs are normalized in float32 and cast back, as ``batchnorm`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normzoo.base import AffineNorm
from normzoo.interface import check_input
from normzoo_plugins.batch_variants.eval_transform import running_normalize

FROZEN = "frozenbn"


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
