"""``normzoo.stats``: the per-channel sums, moments and multiply-add that the norms build on,
against torch's own reductions and plain broadcasting."""

from __future__ import annotations

import pytest
import torch

from normzoo.layouts import get_layout
from normzoo.stats import batch_moments, channel_affine, channel_sum, multiply_add

#: (layout, input shape): channel dimension 1, except ``seq`` (channels last).
SHAPES = [
    ("fc", (7, 5)),
    ("conv1d", (6, 4, 9)),
    ("conv", (5, 3, 6, 4)),
    ("conv3d", (4, 2, 3, 5, 3)),
    ("seq", (4, 6, 3)),
]


def _channel_dims(layout: str, x: torch.Tensor) -> list[int]:
    axis = get_layout(layout).channel_axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


@pytest.mark.parametrize("layout,shape", SHAPES)
def test_channel_sum_and_moments_equal_torch_reductions(layout, shape):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 100
    dims = _channel_dims(layout, x)
    torch.testing.assert_close(channel_sum(x, layout), x.sum(dims), rtol=1e-12, atol=0)
    mean, var = batch_moments(x, layout)
    ref_var, ref_mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "layout,shape,channels_last",
    [(layout, shape, False) for layout, shape in SHAPES] + [("conv", (5, 3, 6, 4), True)],
)
def test_multiply_add_is_scale_times_x_plus_shift(layout, shape, channels_last):
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    spec = get_layout(layout)
    channels = x.shape[spec.channel_axis]
    scale = torch.randn(channels, dtype=torch.float64).reshape(spec.channel_shape(channels))
    shift = torch.randn(channels, dtype=torch.float64).reshape(spec.channel_shape(channels))
    out = multiply_add(x, scale, shift)
    torch.testing.assert_close(out, scale * x + shift, rtol=1e-14, atol=1e-14)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)  # x's format is kept
    full_shift = torch.randn(shape, dtype=torch.float64)  # a shift as large as x works too
    torch.testing.assert_close(multiply_add(x, scale, full_shift), scale * x + full_shift)


def test_multiply_add_takes_any_broadcastable_scale_and_shift():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    per_example = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    scalar = torch.tensor(2.0, dtype=torch.float64)
    row = torch.randn(6, dtype=torch.float64)
    for scale, shift in ((per_example, scalar), (scalar, per_example), (row, per_example)):
        torch.testing.assert_close(multiply_add(x, scale, shift), scale * x + shift)


@pytest.mark.parametrize("batch", [1, 3])
def test_multiply_add_passes_float64_gradcheck(batch):
    x = torch.randn(batch, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(multiply_add, (x, scale, shift))


def test_channel_affine_casts_parameters_and_skips_missing_ones():
    y = torch.randn(4, 3, 5, 5)
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out = channel_affine(y, weight, bias, "conv")
    assert out.dtype == torch.float32
    expected = y * weight.float().reshape(1, 3, 1, 1) + bias.float().reshape(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert channel_affine(y, None, None, "conv") is y
    torch.testing.assert_close(channel_affine(y, None, bias, "conv"),
                               y + bias.float().reshape(1, 3, 1, 1))  # fmt: skip
