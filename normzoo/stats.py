"""Batch statistics shared by norm plugins: per-channel moments and the channel-matrix view.

Everything here is plain autograd-friendly tensor code; a norm calls it on its input in
``train()`` mode. The reduction runs over every dimension but the channel one: ``N`` for the
``fc`` layout, ``N, H, W`` for ``conv``.
"""

from __future__ import annotations

import torch

from normzoo.interface import LAYOUT_NDIM


def reduce_dims(layout: str) -> tuple[int, ...]:
    """Dimensions averaged over for per-channel statistics: ``(0,)`` or ``(0, 2, 3)``."""
    return (0,) if LAYOUT_NDIM[layout] == 2 else (0, 2, 3)


def channel_shape(num_features: int, layout: str) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against an input of ``layout``."""
    return (1, num_features) + (1,) * (LAYOUT_NDIM[layout] - 2)


def batch_moments(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x``, kept broadcastable against ``x``.

    The variance is ``mean((x - mean)**2)``, the two-pass form, which loses no precision when
    the mean is large compared with the spread (``E[x^2] - E[x]^2`` would).
    """
    dims = reduce_dims(layout)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    return mean, var


def values_per_channel(x: torch.Tensor) -> int:
    """How many values each channel has in ``x``: ``N`` or ``N * H * W``."""
    return x.numel() // x.shape[1]


def to_channel_matrix(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` of shape ``(N, C, ...)`` as a ``(C, m)`` matrix, ``m`` = values per channel."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def from_channel_matrix(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_channel_matrix`: reshape ``(C, m)`` back to the shape of ``like``."""
    shape = (like.shape[1], like.shape[0]) + tuple(like.shape[2:])
    return matrix.reshape(shape).transpose(0, 1)


def unbiased(biased: torch.Tensor, count: int) -> torch.Tensor:
    """Bessel's correction of a variance or covariance estimated from ``count`` values."""
    return biased * (count / (count - 1))


@torch.no_grad()
def update_running(running: torch.Tensor, batch: torch.Tensor, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, in place: torch's convention.

    Every bundled norm updates its running statistics through this one function, which is
    what lets the harness turn the exponential average into a plain mean over ``k`` batches by
    setting ``momentum = 1/k`` (see ``normzoo.harness.train.reestimate_running_stats``).
    """
    running.lerp_(batch.to(running.dtype), momentum)


def channel_affine(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, layout: str
) -> torch.Tensor:
    """``weight * y + bias`` with one ``(weight, bias)`` pair per channel of ``layout``."""
    shape = channel_shape(weight.shape[0], layout)
    return weight.reshape(shape) * y + bias.reshape(shape)
