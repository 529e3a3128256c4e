"""normzoo.convert: any registered norm into any model, carrying over what means the same."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normzoo
from normzoo import ConvertError, ConvertWarning, convert
from normzoo.convert import is_normzoo_norm


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # running statistics and affine that are not the defaults
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("norm", [info.name for info in normzoo.available()])
def test_every_norm_converts_resnet18_and_trains(norm):
    model = resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvertWarning)
        convert(model, norm)
    replaced = [m for m in model.modules() if is_normzoo_norm(m)]
    assert len(replaced) == 20 and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    x = torch.randn(2, 3, 40, 40)  # 2 x 2 positions at layer 4: instance norm has 4 values
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()(x)


def test_torch_batchnorm_round_trip_gives_identical_eval_outputs():
    original = resnet18().eval()
    x = torch.randn(3, 3, 64, 64)
    expected = original(x)
    model = convert(resnet18().eval(), "batchnorm")
    assert type(model.bn1).__name__ == "BatchNorm" and not model.bn1.training
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)  # another kernel
    back = convert(model, "torch-batchnorm")
    assert isinstance(back.bn1, _BatchNorm)  # torch's own batch norm, for export
    assert torch.equal(back(x), expected)  # torch's kernel on the same numbers: bit for bit
    assert int(back.bn1.num_batches_tracked) == 7


def test_eps_momentum_and_affine_are_taken_from_the_replaced_layer_unless_given():
    layer = nn.BatchNorm1d(5, eps=1e-3, momentum=0.3, affine=False)
    new = convert(layer, "batchnorm")
    assert (new.eps, new.momentum, new.weight, new.layout) == (1e-3, 0.3, None, "fc")
    assert convert(nn.BatchNorm1d(5, eps=1e-3), "batchnorm", eps=1e-4).eps == 1e-4
    assert convert(nn.GroupNorm(3, 6), "groupnorm").groups == 3


def test_training_flag_device_dtype_and_requires_grad_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double().eval()
    model[1].weight.requires_grad_(False)
    convert(model, "zca")
    assert not model[1].training and model[1].weight.dtype == torch.float64
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad


def test_a_layer_shared_by_two_parents_is_replaced_once():
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), shared), nn.Sequential(shared))
    convert(model, "layernorm")
    assert model[0][1] is model[1][0] and type(model[1][0]).__name__ == "GroupNorm"


def test_layers_with_hooks_or_their_own_forward_are_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].register_forward_hook(lambda *args: None)
    with pytest.raises(ConvertError, match=r"^1 \(BatchNorm1d\) has forward_hooks"):
        convert(model, "batchnorm")

    class Clipped(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x).clamp(-1, 1)

    with pytest.raises(ConvertError, match=r"^0 \(Clipped\) overrides forward"):
        convert(nn.Sequential(Clipped(4)), "batchnorm")
    model = nn.Sequential(Clipped(4), nn.BatchNorm1d(4))
    convert(model, "layernorm", match=lambda name, m: type(m) is nn.BatchNorm1d)
    assert type(model[0]) is Clipped and type(model[1]).__name__ == "GroupNorm"


def test_wrapped_models_unknown_norms_and_unsupported_layouts_are_refused():
    with pytest.raises(ConvertError, match="wrapped in DataParallel; convert model.module"):
        convert(nn.DataParallel(nn.BatchNorm1d(3)), "batchnorm")
    with pytest.raises(normzoo.UnknownNormError):
        convert(nn.BatchNorm1d(3), "batchnrom")
    with pytest.raises(ConvertError, match=r"needs layout 'fc', which norm 'instancenorm'"):
        convert(nn.Sequential(nn.BatchNorm1d(3)), "instancenorm")


def test_what_cannot_be_carried_over_is_listed_in_one_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(ConvertWarning, match=r"running_var of 1 layer\(s\) \(1\)") as caught:
        convert(model, "zca")  # zca keeps running_mean, but a covariance, not a variance
    assert "running_mean" not in str(caught[0].message)
    with pytest.warns(ConvertWarning, match=r"weight of 1 layer\(s\) \(1\); bias of 1"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "pit", affine=False)
    with pytest.warns(ConvertWarning, match=r"batch statistics in eval \(track_running_stats"):
        convert(nn.BatchNorm2d(4, track_running_stats=False), "batchnorm")


def test_a_failed_conversion_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.BatchNorm1d(4))
    before = [type(m) for m in model]
    with pytest.raises(ConvertError, match=r"^3 \(BatchNorm1d\) needs layout 'fc'"):
        convert(model, "instancenorm")  # fine for the first, impossible for the second
    assert [type(m) for m in model] == before
    with pytest.raises(TypeError, match="takes the model first and the norm's name second"):
        convert("batchnorm", model)
