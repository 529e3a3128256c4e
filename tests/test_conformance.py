"""Every registered norm, bundled or third-party, passes every conformance check."""

import pytest

import normzoo
from normzoo.testing import CONFORMANCE_CHECKS, run_check

NORMS = [norm.name for norm in normzoo.available()]


def test_bundled_norms_are_registered():
    assert {"batchnorm", "torch-batchnorm", "layernorm", "none"} <= set(NORMS)


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
@pytest.mark.parametrize("norm", NORMS)
def test_norm_conforms(norm, check):
    run_check(check, norm)
