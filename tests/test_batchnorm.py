"""`batchnorm`, written from scratch, equals torch's batch norm in float64: outputs, gradients
and running statistics, in train and eval mode, for both layouts."""

import pytest
import torch
import torch.nn.functional as F

import normzoo

SHAPES = {"fc": (32, 16), "conv": (8, 16, 5, 5)}


def reference_step(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


@pytest.mark.parametrize("layout", ["fc", "conv"])
def test_matches_torch_batch_norm_in_train_and_eval(layout):
    torch.manual_seed(0)
    ours = normzoo.build("batchnorm", 16, layout=layout).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.uniform_(-1.0, 1.0)
    weight = ours.weight.detach().clone().requires_grad_(True)
    bias = ours.bias.detach().clone().requires_grad_(True)
    running_mean = torch.zeros(16, dtype=torch.float64)
    running_var = torch.ones(16, dtype=torch.float64)

    for step, training in enumerate([True, True, True, False, False]):
        ours.train(training)
        x = (3.0 * torch.randn(SHAPES[layout], dtype=torch.float64) + 2.0).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        upstream = torch.randn(SHAPES[layout], dtype=torch.float64)

        y = ours(x)
        y_ref = reference_step(x_ref, weight, bias, running_mean, running_var, training)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)

        ours.zero_grad()
        weight.grad = bias.grad = None
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6, msg=f"step {step}: dx")
        torch.testing.assert_close(ours.weight.grad, weight.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.bias.grad, bias.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.running_mean, running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.running_var, running_var, rtol=0, atol=1e-12)


def test_matches_torch_module_with_custom_momentum_and_eps():
    torch.manual_seed(1)
    ours = normzoo.build("batchnorm", 16, layout="conv", momentum=0.3, eps=1e-3).double()
    theirs = torch.nn.BatchNorm2d(16, momentum=0.3, eps=1e-3).double()
    for _ in range(4):
        x = torch.randn(SHAPES["conv"], dtype=torch.float64) * 5 - 1
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    ours.eval()
    theirs.eval()
    x = torch.randn(SHAPES["conv"], dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 4


def test_state_dict_loads_into_torch_batchnorm():
    """The buffers use torch's names, so weights move between the two implementations."""
    ours = normzoo.build("batchnorm", 6, layout="conv")
    ours(torch.randn(4, 6, 3, 3))
    theirs = torch.nn.BatchNorm2d(6)
    theirs.load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_wrong_input_shape_names_layout_and_features():
    layer = normzoo.build("batchnorm", 16, layout="conv")
    with pytest.raises(
        normzoo.LayoutError, match=r"\(N, C, H, W\) with C=16, got shape \(4, 8, 3, 3\)"
    ):
        layer(torch.randn(4, 8, 3, 3))
