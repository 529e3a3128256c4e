"""Every registered norm, bundled or third-party, passes every conformance check on every layout
it declares, with its default options and with options that constrain the channel count."""

import pytest

import normzoo
from normzoo.layouts import LAYOUT_NAMES
from normzoo.testing import CONFORMANCE_CHECKS, run_check

NORMS = [norm.name for norm in normzoo.available()]
#: Norms with options worth checking beyond the defaults: (name, options, num_features).
CONFIGURED = [
    ("groupnorm", {"groups": 4}, 8),
    ("zca", {"group_size": 3}, 7),  # a smaller last group
    ("batchnorm", {"momentum": None, "affine": False}, None),
    ("pit", {"num_knots": 8, "sample_size": 64}, 5),  # knots from a strided sample
]


def test_bundled_norms_are_registered():
    assert {
        "batchnorm", "torch-batchnorm", "layernorm", "groupnorm", "instancenorm", "rmsnorm",
        "none", "zca", "iternorm", "pit",
    } <= set(NORMS)  # fmt: skip


@pytest.mark.parametrize("norm", NORMS)
def test_bundled_norms_declare_every_meaningful_layout(norm):
    expected = set(LAYOUT_NAMES) - ({"fc"} if norm == "instancenorm" else set())
    if normzoo.info(norm).plugin in {"batchnorm", "torch-norms", "whitening", "pit"}:
        assert set(normzoo.info(norm).layouts) == expected


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
@pytest.mark.parametrize("norm", NORMS)
def test_norm_conforms(norm, check):
    run_check(check, norm)


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
@pytest.mark.parametrize("norm, options, num_features", CONFIGURED)
def test_norm_conforms_with_options(norm, options, num_features, check):
    run_check(check, norm, options=options, num_features=num_features)
