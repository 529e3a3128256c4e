"""The example plugin, installed as a user would (`pip install -e examples/normzoo-mean-only-bn`,
as CI does): found through its entry point, conformant, and its comparison page in step."""

from pathlib import Path

import pytest

import normzoo
from normzoo.testing import CONFORMANCE_CHECKS, run_check

pytest.importorskip("normzoo_mean_only_bn", reason="the example plugin is not installed")
PAGE = Path(__file__).resolve().parent.parent / "comparison.md"


def test_the_installed_plugin_is_found_through_its_entry_point():
    (record,) = [p for p in normzoo.plugins() if p.name == "mean-only-bn"]
    assert record.distribution == "normzoo-mean-only-bn" and record.norms == ["mean-only-bn"]


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
def test_mean_only_bn_conforms(check):
    run_check(check, "mean-only-bn")
    run_check(check, "mean-only-bn", options={"momentum": None}, num_features=8)


def test_its_comparison_page_is_in_step_with_its_results():
    from normzoo.compare import check

    assert check([PAGE]) == []
