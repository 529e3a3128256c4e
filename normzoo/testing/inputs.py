"""The inputs the conformance checks feed a norm, public so that a third party's own tests can
use the same ones.

Reproducible (seeded), with channels of different means and scales, so that a norm that mixes
channels up or normalizes with the wrong statistics cannot pass by accident; the shapes follow
each layout of :mod:`normzoo.layouts`, with enough values per channel for stable batch
statistics, and smaller ones for gradcheck, which costs two forwards per input element.
"""

from __future__ import annotations

import torch

from normzoo.layouts import Layout, get_layout


def sample_input(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layout: str | Layout = "conv",
) -> torch.Tensor:
    """A reproducible input whose channels have different means and scales."""
    layout = get_layout(layout) if len(shape) != 2 else get_layout("fc")
    axis = layout.channel_axis if len(shape) == layout.ndim else 1
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    channels = torch.arange(shape[axis], dtype=torch.float64)
    view = tuple(shape[axis] if d == axis else 1 for d in range(len(shape)))
    return (x * (1.0 + channels).reshape(view) + (channels - 1.5).reshape(view)).to(dtype)


def input_shape(layout: Layout, num_features: int) -> tuple[int, ...]:
    """Shape of the suite's inputs: enough values per channel for stable batch statistics."""
    return layout.test_shape(num_features, batch=16 if layout.ndim == 2 else 4)


def gradcheck_shape(layout: Layout, num_features: int) -> tuple[int, ...]:
    """A smaller shape for gradcheck: 6 examples for ``fc``, else 2 with sizes of 2."""
    batch = 6 if layout.ndim == 2 else 2
    return tuple(batch if d == "N" else num_features if d == "C" else 2 for d in layout.dims)
