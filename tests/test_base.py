"""``NormBase``: shared parameters and buffers, torch's momentum conventions (``None`` included),
versioned state dicts that still load what normzoo 0.1.0 saved, and the re-estimation
capability the harness uses."""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import normzoo
from normzoo.base import AffineNorm, NormBase, cumulative_running_stats, reestimable_norms
from normzoo.interface import check_batch_size, check_input

FIXTURE = Path(__file__).parent / "fixtures" / "state_dicts_0.1.0.pt"
STATEFUL = ["batchnorm", "zca", "iternorm", "pit"]
#: Norms whose running statistics include a running mean of the batch means.
MEAN_TRACKING = ["batchnorm", "zca", "iternorm"]


@pytest.mark.parametrize("key", sorted(torch.load(FIXTURE, weights_only=True)))
def test_a_state_dict_saved_by_normzoo_0_1_0_still_loads(key):
    """The fixture was saved before NormBase existed (see tests/fixtures/README.md)."""
    saved = torch.load(FIXTURE, weights_only=True)[key]
    module = normzoo.build(saved["name"], saved["num_features"], saved["layout"])
    module.load_state_dict(saved["state_dict"])  # strict: every key accounted for
    module.eval()
    # pit's math changed (version 2): its converted table is the same distribution function,
    # interpolated in the probit scale and resampled to 64 knots (docs/norms/pit.md)
    tolerance = 1e-6 if normzoo.info(saved["name"]).version == "1" else 0.08
    with torch.no_grad():
        output = module(saved["input"])
    torch.testing.assert_close(output, saved["eval_output"], rtol=0, atol=tolerance)
    if isinstance(module, NormBase) and "num_batches_tracked" not in saved["state_dict"]:
        assert int(module.num_batches_tracked) == 0  # version 1 of the whitening norms


@pytest.mark.parametrize("norm", STATEFUL)
def test_bundled_stateful_norms_derive_from_normbase(norm):
    module = normzoo.build(norm, 4, layout="fc")
    assert isinstance(module, NormBase)
    assert module.state_dict()._metadata[""]["version"] == type(module)._version >= 2
    assert isinstance(module.weight, nn.Parameter) and isinstance(module.bias, nn.Parameter)
    assert "num_batches_tracked" in module.state_dict()


@pytest.mark.parametrize("norm", MEAN_TRACKING)
def test_momentum_none_keeps_a_cumulative_average_of_the_batch_statistics(norm):
    module = normzoo.build(norm, 3, layout="fc", momentum=None).double()
    batches = [torch.randn(64, 3, dtype=torch.float64) * (k + 1) + k for k in range(5)]
    for x in batches:
        module(x)
    means = torch.stack([x.mean(0) for x in batches]).mean(0)
    torch.testing.assert_close(module.running_mean, means, rtol=0, atol=1e-12)
    assert int(module.num_batches_tracked) == 5


def test_batchnorm_cumulative_average_equals_the_mean_of_batch_variances_and_torch():
    ours = normzoo.build("batchnorm", 3, layout="conv", momentum=None).double()
    theirs = nn.BatchNorm2d(3, momentum=None).double()
    batches = [torch.randn(4, 3, 5, 5, dtype=torch.float64) * (k + 1) for k in range(4)]
    for x in batches:
        ours(x)
        theirs(x)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in batches]).mean(0)
    torch.testing.assert_close(ours.running_var, variances, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=1e-12)


def test_momentum_none_on_the_command_line():
    assert normzoo.build("batchnorm", 3, momentum="none").momentum is None
    with pytest.raises(normzoo.OptionError, match="'eps' of norm 'batchnorm' cannot be None"):
        normzoo.build("batchnorm", 3, eps=None)


@pytest.mark.parametrize("norm", STATEFUL)
def test_reset_running_stats_restores_the_initial_state(norm):
    module = normzoo.build(norm, 3, layout="fc")
    fresh = {key: value.clone() for key, value in module.state_dict().items()}
    module(torch.randn(32, 3) * 4 + 2)
    module.reset_running_stats()
    for key, value in module.state_dict().items():
        if key not in ("weight", "bias"):
            assert torch.equal(value, fresh[key]), key


@pytest.mark.parametrize("norm", STATEFUL + ["layernorm", "groupnorm", "rmsnorm"])
def test_affine_false_has_no_parameters_and_is_the_plain_normalization(norm):
    plain = normzoo.build(norm, 4, layout="fc", affine=False)
    assert list(plain.parameters()) == [] and plain.weight is None and plain.bias is None
    affine = normzoo.build(norm, 4, layout="fc")
    affine.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * 3
    # gamma 1 and beta 0 are the identity, up to float32 rounding in torch's fused kernels
    torch.testing.assert_close(plain(x), affine(x), rtol=1e-5, atol=1e-5)
    assert "affine=False" in repr(plain)


def test_extra_repr_names_every_setting():
    text = repr(normzoo.build("iternorm", 8, layout="seq", momentum=None, iterations=3))
    for part in ("8", "layout='seq'", "momentum=None", "affine=True", "iterations=3"):
        assert part in text


def test_modules_pickle_with_their_running_statistics():
    module = normzoo.build("pit", 3, layout="fc")
    module(torch.randn(64, 3))
    copy = pickle.loads(pickle.dumps(module))
    assert torch.equal(copy.running_knots, module.running_knots)
    copy.reset_running_stats()
    assert int(copy.num_batches_tracked) == 0


class CenterNorm(NormBase):
    """A third party's norm on NormBase: subtract a running mean only."""

    _version = 3

    def __init__(self, num_features, layout, momentum=0.1):
        super().__init__(num_features, layout, momentum=momentum, affine=False)
        self.register_running_stat("running_center", partial(torch.zeros, num_features))

    def forward(self, x):
        check_input(x, self.num_features, self.layout, "center")
        layout = self.layout_spec
        if self.training:
            check_batch_size(x, "center", self.layout)
            mean = x.mean(dim=layout.reduce_dims)
            self.update_running_stats(running_center=mean)
            center = mean
        else:
            center = self.running_center
        return x - center.reshape(layout.channel_shape(self.num_features))

    def upgrade_state_dict(self, state_dict, prefix, version):
        super().upgrade_state_dict(state_dict, prefix, version)
        if version < 3 and prefix + "running_mean" in state_dict:
            state_dict[prefix + "running_center"] = state_dict.pop(prefix + "running_mean")


def test_a_subclass_renaming_a_buffer_upgrades_older_state_dicts():
    module = CenterNorm(3, "fc")
    old = nn.Module().state_dict()  # an OrderedDict with torch's metadata, as saved
    old["running_mean"] = torch.tensor([1.0, 2.0, 3.0])
    old._metadata = {"": {"version": 2}}  # saved before the rename, without a counter
    module.load_state_dict(old)
    assert torch.equal(module.running_center, torch.tensor([1.0, 2.0, 3.0]))
    assert int(module.num_batches_tracked) == 0


def test_a_third_party_normbase_subclass_passes_the_conformance_suite():
    from normzoo import NormInfo, Registry
    from normzoo.testing import check_norm

    registry = Registry(entry_points=False)
    registry.register(
        NormInfo(
            name="center", summary="running-mean centring", layouts=("fc", "conv", "seq"),
            uses_batch_stats=True, factory=CenterNorm,
            options=(normzoo.MOMENTUM,),
        )
    )  # fmt: skip
    # no learned parameters: nothing for eval_uses_parameters to vary; every check must pass
    check_norm("center", registry)


def test_reestimable_norms_are_declared_not_guessed():
    class HasMomentumAttribute(nn.Module):  # a float momentum is not the capability
        momentum = 0.1

    model = nn.Sequential(
        normzoo.build("batchnorm", 3, layout="fc"),
        normzoo.build("torch-batchnorm", 3, layout="fc"),
        normzoo.build("layernorm", 3, layout="fc"),
        HasMomentumAttribute(),
        nn.BatchNorm1d(3, track_running_stats=False),
    )
    assert [type(m).__name__ for m in reestimable_norms(model)] == ["BatchNorm", "TorchBatchNorm"]
    assert isinstance(model[2], AffineNorm) and not isinstance(model[2], NormBase)


@pytest.mark.parametrize("norm", MEAN_TRACKING + ["torch-batchnorm"])
def test_cumulative_running_stats_replaces_them_by_the_plain_mean(norm):
    module = normzoo.build(norm, 3, layout="fc", momentum=0.3).double()
    module(torch.randn(32, 3, dtype=torch.float64) * 10)  # stale statistics to forget
    batches = [torch.randn(32, 3, dtype=torch.float64) + k for k in range(3)]
    with cumulative_running_stats([module]):
        for x in batches:
            module(x)
    assert module.momentum == 0.3
    expected = torch.stack([x.mean(0) for x in batches]).mean(0)
    torch.testing.assert_close(module.running_mean, expected, rtol=0, atol=1e-12)
