"""Reliability of the norm-facing tools: convert refuses what it cannot convert, the conformance
suite cannot hang and catches a norm that writes into its input, and options reject values that
do not survive parsing or make no sense for the math."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from torch import nn

import normzoo
from normzoo import ConvertError, ConvertWarning, NormInfo, Registry, convert, testing
from normzoo.cli import main
from normzoo.interface import EPS, check_input
from normzoo.testing import CONFORMANCE_CHECKS, check_norm, run_check

# --- convert: TorchScript ------------------------------------------------------------------


def test_a_scripted_model_is_refused_by_name():
    model = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(ConvertError, match=r"^the model itself \(Sequential\) is TorchScript"):
        convert(model, "batchnorm")


def test_a_scripted_submodule_is_refused_by_name_and_nothing_changes():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), torch.jit.script(nn.Sequential(nn.BatchNorm2d(4)))
    )
    with pytest.raises(ConvertError, match=r"^2 \(Sequential\) is TorchScript") as caught:
        convert(model, "layernorm")
    assert "\n" not in str(caught.value) and "script" in str(caught.value).split(";")[1]
    assert type(model[1]) is nn.BatchNorm2d  # all or nothing, as for every other refusal


# --- convert: the meta device --------------------------------------------------------------


@pytest.mark.parametrize("norm", [info.name for info in normzoo.available()])
def test_a_meta_model_converts_and_every_new_layer_stays_on_meta(norm):
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4)
        )  # an InstanceNorm2d holds no tensor: its replacement follows its neighbours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvertWarning)
        convert(model, norm)
    for index in (1, 3):
        tensors = list(model[index].parameters()) + list(model[index].buffers())
        assert all(t.device.type == "meta" for t in tensors), (index, norm)
    model.to_empty(device="cpu")  # the usual way out of meta still works


def test_a_layer_without_tensors_takes_the_dtype_of_its_neighbours():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)).double()
    convert(model, "batchnorm")
    assert model[1].running_mean.dtype == torch.float64


# --- the conformance suite: a per-check timeout --------------------------------------------

_RELEASE = threading.Event()


class Blocks(nn.Module):
    """A norm whose forward blocks (as ``time.sleep(1000)`` would) until the test releases it."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()

    def forward(self, x):
        _RELEASE.wait(1000)
        return x


def registry_with(factory, uses_batch_stats: bool = False) -> Registry:
    registry = Registry(entry_points=False)
    registry.register(
        NormInfo(
            name="candidate", summary="a norm under test", layouts=("fc", "conv"),
            uses_batch_stats=uses_batch_stats, factory=factory,
        )
    )  # fmt: skip
    return registry


@pytest.fixture
def release_blocked_forwards():
    _RELEASE.clear()
    yield
    _RELEASE.set()  # the abandoned check threads finish instead of sleeping on


def test_a_blocking_norm_fails_its_check_within_the_timeout(release_blocked_forwards):
    registry = registry_with(Blocks)
    start = time.monotonic()
    with pytest.raises(
        AssertionError,
        match=r"^norm 'candidate': check 'shape_and_dtype' did not finish within 0\.3 s; ",
    ) as caught:
        run_check("shape_and_dtype", "candidate", registry, timeout=0.3)
    assert time.monotonic() - start < 10 and "\n" not in str(caught.value)
    with pytest.raises(AssertionError, match=r"check '\w+' did not finish within 0\.2 s"):
        check_norm("candidate", registry, timeout=0.2)


def test_the_timeout_is_a_generous_module_constant_that_run_check_uses_by_default():
    import inspect

    assert testing.CHECK_TIMEOUT >= 60
    for function in (run_check, check_norm):
        assert inspect.signature(function).parameters["timeout"].default == testing.CHECK_TIMEOUT


def test_a_check_run_under_the_timeout_keeps_its_own_failures():
    class Shrinks(nn.Module):
        def __init__(self, num_features: int, layout: str):
            super().__init__()

        def forward(self, x):
            return x[:1]

    with pytest.raises(AssertionError, match="output shape"):
        run_check("shape_and_dtype", "candidate", registry_with(Shrinks), timeout=30)


def test_run_with_timeout_returns_reraises_and_times_out(release_blocked_forwards):
    assert testing.run_with_timeout(lambda: 42, 5, "forty-two") == 42
    with pytest.raises(KeyError, match="inner"):
        testing.run_with_timeout(lambda: {}["inner"], 5, "a lookup")
    with pytest.raises(TimeoutError, match=r"^a wait did not finish within 0\.2 s"):
        testing.run_with_timeout(lambda: _RELEASE.wait(1000), 0.2, "a wait")
    with pytest.raises(AssertionError, match="custom"):
        testing.run_with_timeout(lambda: _RELEASE.wait(1000), 0.2, "custom", error=AssertionError)
    with torch.no_grad():  # the caller's grad mode reaches the function
        assert testing.run_with_timeout(torch.is_grad_enabled, 5, "grad mode") is False
    assert testing.run_with_timeout(torch.is_grad_enabled, 5, "grad mode") is True
    assert testing.run_with_timeout(lambda: 1, None, "no limit") == 1


# --- the conformance suite: the input is left alone ----------------------------------------


class CentresInPlace(nn.Module):
    """Subtracts the batch mean from its input in place and returns it."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.num_features, self.layout = num_features, layout

    def forward(self, x):
        check_input(x, self.num_features, self.layout, "candidate")
        return x.sub_(x.mean(dim=0, keepdim=True))


class ScalesInPlaceInEval(nn.Module):
    """Leaves its input alone in train mode, and doubles it in place in eval."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()

    def forward(self, x):
        return x * 2 if self.training else x.mul_(2)


def test_the_suite_has_an_input_unchanged_check():
    assert "leaves_input_unchanged" in CONFORMANCE_CHECKS


@pytest.mark.parametrize(
    "factory, message",
    [
        (CentresInPlace, r"norm 'candidate', layout 'fc', train: forward changed its input"),
        (ScalesInPlaceInEval, r"norm 'candidate', layout 'fc', eval: forward changed its input"),
    ],
)
def test_a_norm_that_writes_into_its_input_fails_the_input_check(factory, message):
    with pytest.raises(AssertionError, match=message):
        run_check("leaves_input_unchanged", "candidate", registry_with(factory))


def test_the_input_check_comes_before_the_checks_it_would_mislead():
    order = CONFORMANCE_CHECKS.index
    assert order("leaves_input_unchanged") < order("train_eval")
    with pytest.raises(AssertionError, match="forward changed its input in place"):
        check_norm("candidate", registry_with(CentresInPlace, uses_batch_stats=True))


# --- options: parsing that underflows or overflows -----------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("1e-400", r"^option 'eps' of norm 'batchnorm': '1e-400' underflows float64 to 0\.0; "),
        ("-1e-400", r"'-1e-400' underflows float64 to 0\.0"),
        ("1e400", r"^option 'eps' of norm 'batchnorm': '1e400' overflows float64 to inf; "),
    ],
)
def test_a_value_that_does_not_fit_float64_says_so(text, message):
    with pytest.raises(normzoo.OptionError, match=message) as caught:
        normzoo.build("batchnorm", 4, eps=text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["0", "0.0", "-0", "0e-400", "0x0", "000.000e5"])
def test_a_written_zero_is_still_reported_as_zero(text):
    if text == "0x0":  # not a float literal at all
        with pytest.raises(normzoo.OptionError, match="expects float, got '0x0'"):
            normzoo.build("batchnorm", 4, eps=text)
        return
    with pytest.raises(normzoo.OptionError, match=r"must be > 0\.0, got -?0\.0"):
        normzoo.build("batchnorm", 4, eps=text)


def test_a_written_infinity_is_still_reported_as_not_finite():
    for text in ("inf", "-Infinity", " +INF "):
        with pytest.raises(normzoo.OptionError, match="must be a finite number"):
            normzoo.build("batchnorm", 4, eps=text)


def test_a_tiny_but_representable_value_still_parses():
    assert normzoo.build("batchnorm", 4, eps="1e-320").eps == 1e-320  # subnormal, not zero


# --- options: ranges for eps and delta -----------------------------------------------------


def test_eps_has_a_maximum_that_keeps_its_default():
    assert EPS.default == 1e-5 and EPS.maximum == 1.0
    assert normzoo.build("batchnorm", 4, eps=1.0).eps == 1.0
    with pytest.raises(normzoo.OptionError, match=r"'eps' of norm 'batchnorm' must be <= 1\.0, "):
        normzoo.build("batchnorm", 4, eps="1e300")
    for name in ("batchnorm", "torch-batchnorm", "layernorm", "groupnorm", "zca", "iternorm"):
        with pytest.raises(normzoo.OptionError, match=f"'eps' of norm '{name}' must be <= 1.0"):
            normzoo.build(name, 4, eps=2.0)


def test_pit_delta_keeps_its_default_and_range():
    delta = normzoo.info("pit").option("delta")
    assert (delta.default, delta.minimum, delta.maximum) == (1e-6, 1e-6, 0.25)
    for bad in ("1e-9", "0.5"):
        with pytest.raises(normzoo.OptionError, match="'delta' of norm 'pit' must be"):
            normzoo.build("pit", 4, delta=bad)


def test_info_prints_the_ranges(capsys):
    assert main(["info", "batchnorm"]) == 0
    assert "eps (float, default 1e-05, > 0.0, <= 1.0)" in capsys.readouterr().out
    assert main(["info", "pit"]) == 0
    assert "delta (float, default 1e-06, >= 1e-06, <= 0.25)" in capsys.readouterr().out
