"""Layouts beyond LeNet: every bundled norm on ``fc``, ``conv1d``, ``conv``, ``conv3d`` and ``seq``
against an independent reference (torch's own layers on the equivalent input, or the formula in
numpy), the shape errors, and the new per-example norms (group, instance and RMS norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normzoo
from normzoo.layouts import LAYOUTS, get_layout

C = 6
SHAPES = {"fc": (32, C), "conv1d": (8, C, 7), "conv": (4, C, 5, 5), "conv3d": (2, C, 3, 4, 5)}
TORCH_BN = {"fc": nn.BatchNorm1d, "conv1d": nn.BatchNorm1d, "conv": nn.BatchNorm2d}
TORCH_BN["conv3d"] = nn.BatchNorm3d


def data(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1.5


def seq_data(seed=0):
    return data((4, 9, C), seed)  # (N, L, C)


def randomize_affine(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand(parameter.shape, dtype=parameter.dtype) + 0.5)
    return module


# -- the layout objects ----------------------------------------------------------------------


def test_layout_table():
    assert {name: (layout.shape_text, layout.channel_axis) for name, layout in LAYOUTS.items()} == {
        "fc": ("(N, C)", 1),
        "conv1d": ("(N, C, L)", 1),
        "conv": ("(N, C, H, W)", 1),
        "conv3d": ("(N, C, D, H, W)", 1),
        "seq": ("(N, L, C)", 2),
    }
    assert get_layout("conv2d") is LAYOUTS["conv"]
    assert LAYOUTS["seq"].reduce_dims == (0, 1) and LAYOUTS["seq"].example_dims == (2,)
    assert LAYOUTS["conv3d"].reduce_dims == (0, 2, 3, 4)
    assert LAYOUTS["conv"].example_dims == (1, 2, 3) and LAYOUTS["conv"].spatial_dims == (2, 3)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_channel_matrix_round_trip(name):
    layout = LAYOUTS[name]
    x = torch.randn(layout.test_shape(3, batch=2))
    matrix = layout.to_channel_matrix(x)
    assert matrix.shape == (3, x.numel() // 3)
    torch.testing.assert_close(matrix[1], x.select(layout.channel_axis, 1).reshape(-1))
    assert torch.equal(layout.from_channel_matrix(matrix, x), x)


def test_conv2d_is_accepted_as_an_alias_of_conv():
    layer = normzoo.build("batchnorm", C, layout="conv2d")
    assert layer.layout == "conv"
    x = data(SHAPES["conv"]).float()
    assert layer(x).shape == x.shape


@pytest.mark.parametrize(
    "norm, layout, shape",
    [
        ("batchnorm", "seq", (4, C, 9)),
        ("layernorm", "conv", (4, C, 5)),
        ("torch-batchnorm", "fc", (4, C, 3)),
        ("instancenorm", "conv3d", (2, C, 3, 4)),
        ("zca", "conv1d", (4, C + 1, 3)),
    ],
)
def test_a_wrong_input_shape_is_one_line_naming_norm_layout_and_shape(norm, layout, shape):
    layer = normzoo.build(norm, C, layout=layout)
    with pytest.raises(normzoo.LayoutError) as raised:
        layer(torch.randn(shape))
    message = str(raised.value)
    assert "\n" not in message
    assert f"norm {norm!r}" in message and f"layout {layout!r}" in message
    assert f"got shape {shape}" in message
    assert get_layout(layout).shape_text in message


def test_instancenorm_declares_no_fc_layout():
    with pytest.raises(normzoo.LayoutError, match="does not support layout 'fc'"):
        normzoo.build("instancenorm", C, layout="fc")


# -- batch norms on every layout ----------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batchnorm", "torch-batchnorm"])
@pytest.mark.parametrize("layout", ["fc", "conv1d", "conv", "conv3d"])
def test_batch_norms_equal_torch_batch_norm_of_the_same_rank(norm, layout):
    ours = randomize_affine(normzoo.build(norm, C, layout=layout).double())
    theirs = TORCH_BN[layout](C).double()
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x = data(SHAPES[layout], step)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)
    ours.eval()
    theirs.eval()
    x = data(SHAPES[layout], 9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["batchnorm", "torch-batchnorm", "zca", "iternorm", "pit"])
def test_batch_statistic_norms_on_seq_equal_conv1d_on_the_transposed_input(norm):
    """``(N, L, C)`` is ``(N, C, L)`` with the channels moved: same statistics, same output."""
    on_seq = normzoo.build(norm, C, layout="seq").double()
    on_conv1d = normzoo.build(norm, C, layout="conv1d").double()
    randomize_affine(on_seq)
    on_conv1d.load_state_dict(on_seq.state_dict())
    for training in (True, True, False):
        on_seq.train(training)
        on_conv1d.train(training)
        x = seq_data(int(training))
        expected = on_conv1d(x.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(on_seq(x), expected, rtol=0, atol=1e-9)


def test_batchnorm_on_seq_equals_torch_batch_norm_on_the_transposed_input():
    ours = randomize_affine(normzoo.build("batchnorm", C, layout="seq").double())
    theirs = nn.BatchNorm1d(C).double()
    theirs.load_state_dict(ours.state_dict())
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = seq_data(int(training))
        expected = theirs(x.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-10)


# -- per-example norms ---------------------------------------------------------------------------


def test_layernorm_on_seq_equals_nn_layer_norm_over_the_channels():
    ours = randomize_affine(normzoo.build("layernorm", C, layout="seq").double())
    theirs = nn.LayerNorm(C).double()
    theirs.load_state_dict(ours.state_dict())
    x = seq_data()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["fc", "conv1d", "conv", "conv3d"])
def test_layernorm_normalizes_each_example_over_all_its_values(layout):
    ours = randomize_affine(normzoo.build("layernorm", C, layout=layout).double())
    x = data(SHAPES[layout])
    flat = x.reshape(x.shape[0], -1)
    normalized = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(
        flat.var(1, unbiased=False, keepdim=True) + 1e-5
    )
    shape = (1, C) + (1,) * (x.dim() - 2)
    expected = normalized.reshape(x.shape) * ours.weight.reshape(shape) + ours.bias.reshape(shape)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-10)


def groupnorm_np(x: np.ndarray, groups: int, channel_axis: int, eps=1e-5) -> np.ndarray:
    """Group norm from its definition: per example (token on seq), per group of channels."""
    moved = np.moveaxis(x, channel_axis, 1)
    if channel_axis == x.ndim - 1 and x.ndim > 2:  # seq: every token is an example
        moved = moved.transpose(0, 2, 1).reshape(-1, x.shape[-1])
    n, c = moved.shape[:2]
    grouped = moved.reshape(n, groups, -1)
    mean = grouped.mean(axis=2, keepdims=True)
    var = grouped.var(axis=2, keepdims=True)
    out = ((grouped - mean) / np.sqrt(var + eps)).reshape(moved.shape)
    if channel_axis == x.ndim - 1 and x.ndim > 2:
        return out.reshape(x.shape)
    return np.moveaxis(out, 1, channel_axis)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_groupnorm_equals_its_definition(layout, groups):
    ours = normzoo.build("groupnorm", C, layout=layout, groups=groups, affine=False).double()
    x = seq_data() if layout == "seq" else data(SHAPES[layout])
    expected = groupnorm_np(x.numpy(), groups, get_layout(layout).channel_axis)
    np.testing.assert_allclose(ours(x).detach().numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["conv1d", "conv", "conv3d"])
def test_groupnorm_equals_nn_group_norm(layout):
    ours = randomize_affine(normzoo.build("groupnorm", C, layout=layout, groups=3).double())
    theirs = nn.GroupNorm(3, C).double()
    theirs.load_state_dict(ours.state_dict())
    x = data(SHAPES[layout])
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)


def test_groupnorm_groups_must_divide_the_channels():
    with pytest.raises(normzoo.OptionError, match="must divide num_features=6, got 4; choose one"):
        normzoo.build("groupnorm", 6, groups=4)
    assert normzoo.build("groupnorm", 8, groups=4).groups == 4


@pytest.mark.parametrize("layout", ["conv1d", "conv", "conv3d", "seq"])
def test_instancenorm_equals_its_definition(layout):
    ours = randomize_affine(normzoo.build("instancenorm", C, layout=layout).double())
    x = seq_data() if layout == "seq" else data(SHAPES[layout])
    spatial = get_layout(layout).spatial_dims
    mean = x.mean(dim=spatial, keepdim=True)
    var = x.var(dim=spatial, unbiased=False, keepdim=True)
    shape = get_layout(layout).channel_shape(C)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ours.weight.reshape(shape)
    expected = expected + ours.bias.reshape(shape)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-10)
    if layout == "conv":
        theirs = nn.InstanceNorm2d(C, affine=True).double()
        theirs.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)


def test_instancenorm_rejects_a_single_spatial_value():
    with pytest.raises(normzoo.LayoutError, match="more than 1 value per channel in each example"):
        normzoo.build("instancenorm", C, layout="conv")(torch.randn(4, C, 1, 1))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rmsnorm_equals_its_definition(layout):
    ours = randomize_affine(normzoo.build("rmsnorm", C, layout=layout).double())
    assert ours.bias is None  # a scale only, as in the paper
    x = seq_data() if layout == "seq" else data(SHAPES[layout])
    dims = get_layout(layout).example_dims
    rms = torch.sqrt(x.square().mean(dim=dims, keepdim=True) + 1e-5)
    expected = x / rms * ours.weight.reshape(get_layout(layout).channel_shape(C))
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-10)


def test_rmsnorm_on_seq_equals_nn_rms_norm():
    ours = randomize_affine(normzoo.build("rmsnorm", C, layout="seq", eps=1e-6).double())
    theirs = nn.RMSNorm(C, eps=1e-6).double()
    theirs.load_state_dict(ours.state_dict())
    x = seq_data()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)
    conv = randomize_affine(normzoo.build("rmsnorm", C, layout="conv", eps=1e-6).double())
    x = data(SHAPES["conv"])
    expected = F.rms_norm(x, x.shape[1:], eps=1e-6) * conv.weight.reshape(1, C, 1, 1)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-10)


# -- low precision ----------------------------------------------------------------------------

#: Low precision is a promise of the bundled norms (a third-party plugin, such as the example
#: package, may leave float16 to its users).
BUNDLED = sorted(n for p in normzoo.plugins() if p.distribution == "normzoo" for n in p.norms)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", BUNDLED)
def test_low_precision_inputs_are_normalized_in_float32(norm, dtype):
    """Activations around 600 have a variance of 3.6e5, beyond float16's range: statistics in
    float16 overflow. With float32 parameters and buffers (as under autocast) every bundled norm
    takes float16/bfloat16 input, computes in float32, and returns the input's dtype."""
    layout = "conv" if norm != "instancenorm" else "conv1d"
    shape = SHAPES[layout]
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=generator, dtype=torch.float64) * 600 + 600
    module = normzoo.build(norm, C, layout=layout)
    reference = normzoo.build(norm, C, layout=layout).double()
    reference.load_state_dict(module.state_dict())
    x = x64.to(dtype)
    for training in (True, True, False):
        module.train(training)
        reference.train(training)
        with torch.no_grad():
            y = module(x)
            expected = reference(x.double())
        assert y.dtype == dtype and torch.isfinite(y).all()
        if norm != "none":  # not collapsed (EvoNorm-B0 divides by the larger of two scales,
            assert y.float().std() > 0.3  # so its output's spread is below 1: about 0.47 here)
        tolerance = 0.1 if dtype == torch.float16 else 0.5
        torch.testing.assert_close(y.double(), expected, rtol=0.05, atol=tolerance)


@pytest.mark.parametrize("norm", BUNDLED)
def test_a_float16_module_trains_and_evaluates(norm):
    """``module.half()`` keeps parameters and buffers in float16 (as torch's own norms do): the
    statistics are still computed in float32, so moderate activations work in both modes.
    (Running variances beyond float16's 65504 cannot be stored in a float16 buffer, in torch
    as here: keep the norms in float32, as autocast does, for activations that large.)"""
    layout = "conv" if norm != "instancenorm" else "conv1d"
    generator = torch.Generator().manual_seed(1)
    module = normzoo.build(norm, C, layout=layout).half()
    for training in (True, True, False):
        module.train(training)
        x = (torch.randn(SHAPES[layout], generator=generator) * 10 + 5).half()
        with torch.no_grad():
            y = module(x)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
