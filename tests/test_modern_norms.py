"""Reference tests of ``dyt``, ``frn``, ``evonorm-b0``, ``evonorm-s0`` and ``switchnorm``
(plugins/modern.py), in float64.

The references are the code each norm claims to equal, run as published: timm's
``FilterResponseNormTlu2d`` / ``FilterResponseNormAct2d``, ``EvoNorm2dB0`` and ``EvoNorm2dS0``
(timm is a test dependency), and the authors' ``DynamicTanh`` and ``SwitchNorm2d``, copied
verbatim into tests/fixtures/ (see each file's header for origin and license). Each comparison
gives both modules the same (perturbed) parameters and checks, over several training steps and
then in eval: the output, the gradient of the input and of every parameter, and the running
statistics. The state dicts go both ways, and a fresh module of each side equals the other's.

timm's classes compute their statistics in float32 even for float64 input (``x.float()``). So
that they serve as a float64 reference, :func:`timm_in_float64` makes ``Tensor.float`` keep a
float64 tensor as it is while they run; their code is otherwise untouched. A float32 test
compares with timm exactly as it runs, to float32 accuracy.

The reference classes take ``(N, C, H, W)`` (or channels-last ``(..., C)`` for DyT); the other
layouts are reshaped to that without changing what is reduced (:func:`as_reference_input`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from timm.layers import (
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNormAct2d,
    FilterResponseNormTlu2d,
)
from torch import nn

import normzoo
from normzoo.errors import NormzooError, OptionError
from normzoo.layouts import get_layout
from normzoo.testing import CONFORMANCE_CHECKS, run_check, sample_input
from normzoo.workloads.slots import ModelSettings, build_model, check_model_settings
from tests.fixtures.dynamic_tanh import DynamicTanh
from tests.fixtures.switchable_norm import SwitchNorm2d

F64 = torch.float64
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}
#: Input shapes per layout: enough positions for instance statistics, a few channels.
SHAPES = {
    "fc": (12, 8),
    "conv1d": (5, 8, 7),
    "conv": (4, 8, 5, 3),
    "conv3d": (3, 8, 2, 3, 4),
    "seq": (3, 6, 8),
}
STEPS = 4
NORMS = ("dyt", "frn", "evonorm-b0", "evonorm-s0", "switchnorm")


# --- running the references -----------------------------------------------------------------


@contextmanager
def timm_in_float64() -> Iterator[None]:
    """While active, ``Tensor.float()`` returns a float64 tensor unchanged, so that timm's
    classes, which cast their statistics with ``.float()``, compute them in float64."""
    original = torch.Tensor.float

    def keep_float64(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self if self.dtype == F64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    try:
        yield
    finally:
        torch.Tensor.float = original


def as_reference_input(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` as the 4-d input the reference classes take, reducing over the same values:
    ``conv1d`` gets a width of 1, ``conv3d``'s depth and height become one height, ``fc``
    examples and ``seq`` tokens become ``(C, 1, 1)`` images (per-example norms only)."""
    channels = x.shape[get_layout(layout).channel_axis]
    if layout in ("fc", "seq"):
        return x.reshape(-1, channels, 1, 1)
    if layout == "conv1d":
        return x.unsqueeze(-1)
    if layout == "conv3d":
        return x.flatten(2, 3)
    return x


class Reference(nn.Module):
    """A reference class behind normzoo's layouts: the input reshaped for it, the output back,
    its forward run in float64 throughout (see :func:`timm_in_float64`)."""

    def __init__(self, module: nn.Module, layout: str, reshape: bool = True) -> None:
        super().__init__()
        self.module, self.layout, self.reshape = module, layout, reshape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with timm_in_float64():
            if not self.reshape:
                return self.module(x)
            return self.module(as_reference_input(x, self.layout)).reshape(x.shape)


def dyt_reference(channels: int, layout: str, **options) -> Reference:
    """The authors' DynamicTanh: channels last for ``fc`` and ``seq``; ``conv1d`` and
    ``conv3d`` reshaped to 4-d (its ``weight[:, None, None]`` assumes ``(N, C, H, W)``)."""
    channels_last = layout in ("fc", "seq")
    module = DynamicTanh(channels, channels_last, options.get("alpha_init", 0.5))
    return Reference(module, layout, reshape=not channels_last)


def frn_reference(channels: int, layout: str, **options) -> Reference:
    module = FilterResponseNormTlu2d(
        channels, apply_act=options.get("tlu", True), eps=options.get("eps", 1e-6)
    )
    return Reference(module, layout)


def b0_reference(channels: int, layout: str, **options) -> Reference:
    return Reference(EvoNorm2dB0(channels, momentum=options.get("momentum", 0.1)), layout)


def s0_reference(channels: int, layout: str, **options) -> Reference:
    module = EvoNorm2dS0(
        channels, groups=options.get("groups", 2), group_size=options.get("group_size")
    )
    return Reference(module, layout)


def switchnorm_reference(channels: int, layout: str, **options) -> Reference:
    """The authors' SwitchNorm2d; their momentum is the old statistics' weight, 1 - ours."""
    module = SwitchNorm2d(
        channels,
        momentum=1.0 - options.get("momentum", 0.1),
        using_bn=options.get("using_bn", True),
        last_gamma=options.get("last_gamma", False),
    )
    return Reference(module, layout)


REFERENCES: dict[str, Callable[..., Reference]] = {
    "dyt": dyt_reference,
    "frn": frn_reference,
    "evonorm-b0": b0_reference,
    "evonorm-s0": s0_reference,
    "switchnorm": switchnorm_reference,
}


def pair(norm: str, layout: str, channels: int = 8, **options) -> tuple[nn.Module, Reference]:
    """normzoo's module with perturbed parameters, and the reference with the same ones."""
    ours = normzoo.build(norm, channels, layout, **options).to(F64)
    reference = REFERENCES[norm](channels, layout, **options).to(F64)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=F64))
    copy_state(ours, reference.module)
    return ours, reference


def copy_state(source: nn.Module, target: nn.Module) -> None:
    """Every parameter and buffer ``target`` has, from ``source``'s of the same name (shapes
    differ where the authors keep ``(1, C, 1, 1)``)."""
    values = dict(source.named_parameters()) | dict(source.named_buffers())
    with torch.no_grad():
        for name, tensor in [*target.named_parameters(), *target.named_buffers()]:
            tensor.copy_(values[name].reshape(tensor.shape))


# --- the comparison ---------------------------------------------------------------------------


def step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward and backward: the output, the input's gradient and each parameter's."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (y * upstream).sum().backward()
    found = {"y": y.detach(), "grad x": x.grad}
    for name, parameter in module.named_parameters():
        found[f"grad {name.removeprefix('module.')}"] = parameter.grad
    return found


def assert_same(ours: dict, theirs: dict, where: str) -> None:
    assert ours.keys() == theirs.keys(), where
    for key, value in ours.items():
        torch.testing.assert_close(
            theirs[key].reshape(value.shape),
            value,
            **TOLERANCE,
            msg=lambda m, key=key: f"{where}, {key}: {m}",
        )


def assert_same_state(ours: nn.Module, reference: nn.Module, where: str) -> None:
    theirs = reference.state_dict()
    for name, value in ours.state_dict().items():
        if name == "num_batches_tracked":
            continue  # normzoo's counter; the references keep none
        torch.testing.assert_close(
            theirs[name].reshape(value.shape),
            value,
            **TOLERANCE,
            msg=lambda m, name=name: f"{where}, {name}: {m}",
        )


def compare(norm: str, layout: str, channels: int = 8, **options) -> None:
    """:data:`STEPS` training steps and then eval, ours against the reference's."""
    ours, reference = pair(norm, layout, channels, **options)
    sizes = list(SHAPES[layout])
    sizes[get_layout(layout).channel_axis] = channels
    shape = tuple(sizes)
    generator = torch.Generator().manual_seed(11)
    for mode, seeds in (("train", range(STEPS)), ("eval", range(STEPS, STEPS + 2))):
        ours.train(mode == "train")
        reference.train(mode == "train")
        for seed in seeds:
            x = sample_input(shape, F64, seed, layout) * 1.5
            upstream = torch.randn(shape, generator=generator, dtype=F64)
            where = f"{norm} {options}, {layout}, {mode} step {seed}"
            assert_same(step(ours, x, upstream), step(reference, x, upstream), where)
            assert_same_state(ours, reference.module, where)


CASES = [
    ("dyt", {}),
    ("dyt", {"alpha_init": 2.0}),
    ("frn", {}),
    ("frn", {"tlu": False, "eps": 1e-3}),
    ("evonorm-b0", {}),
    ("evonorm-b0", {"momentum": 0.3}),
    ("evonorm-s0", {}),
    ("evonorm-s0", {"groups": 4}),
    ("evonorm-s0", {"group_size": 8}),
    ("switchnorm", {}),
    ("switchnorm", {"momentum": 0.3}),
    ("switchnorm", {"using_bn": False}),
    ("switchnorm", {"last_gamma": True}),
]


@pytest.mark.parametrize(
    "norm, options, layout",
    [(n, o, layout) for n, o in CASES for layout in normzoo.info(n).layouts],
    ids=lambda value: str(value),
)
def test_equals_its_reference_in_float64_train_and_eval(norm, options, layout):
    compare(norm, layout, **options)


def test_evonorm_s0_equals_timm_at_timms_own_32_groups():
    compare("evonorm-s0", "conv", channels=64, groups=32)


@pytest.mark.parametrize("norm", ["frn", "evonorm-b0", "evonorm-s0"])
def test_equals_timm_as_timm_runs_in_float32(norm):
    """timm unchanged, statistics in float32 as it computes them: equal to float32 rounding."""
    ours = normzoo.build(norm, 8, "conv")
    reference = {"frn": frn_reference, "evonorm-b0": b0_reference, "evonorm-s0": s0_reference}
    theirs = reference[norm](8, "conv").module
    copy_state(ours, theirs)
    for seed, training in enumerate((True, True, False)):
        ours.train(training)
        theirs.train(training)
        x = sample_input((4, 8, 5, 3), seed=seed) * 1.5
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        expected, got = step(theirs, x, upstream), step(ours, x, upstream)
        for key, value in got.items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-5)
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-6, atol=1e-7)


# --- state dicts, initial values and options -----------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_a_fresh_module_equals_a_fresh_reference(norm):
    """Initial values as the reference's: no copying of parameters."""
    ours = normzoo.build(norm, 8, "conv")
    theirs = REFERENCES[norm](8, "conv").module
    assert_same_state(ours, theirs, norm)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()}


@pytest.mark.parametrize("norm", NORMS)
def test_the_references_state_dict_loads_and_ours_loads_into_it(norm):
    """Reference to normzoo with ``strict`` loading (normzoo's counter starts at 0), and back;
    both give the reference's eval output."""
    _, trained = pair(norm, "conv")
    trained.train()
    with torch.no_grad():
        for seed in range(3):
            trained(sample_input((4, 8, 5, 3), F64, seed, "conv"))
    ours = normzoo.build(norm, 8, "conv").to(F64)
    ours.load_state_dict(trained.module.state_dict())
    x = sample_input((4, 8, 5, 3), F64, 9, "conv")
    expected = trained.eval()(x)
    torch.testing.assert_close(ours.eval()(x), expected, **TOLERANCE)
    back = REFERENCES[norm](8, "conv").to(F64)
    shapes = {name: value.shape for name, value in back.module.state_dict().items()}
    state = {name: value.reshape(shapes[name]) for name, value in ours.state_dict().items()
             if name != "num_batches_tracked"}  # fmt: skip
    back.module.load_state_dict(state)
    torch.testing.assert_close(back.eval()(x), expected, **TOLERANCE)


def test_frn_without_tlu_followed_by_relu_is_timms_filter_response_norm_act():
    """``FilterResponseNormAct2d`` ends with a ReLU instead of the TLU: ``frn`` with
    ``tlu=False`` and a ReLU after it, on its state dict."""
    theirs = FilterResponseNormAct2d(8, eps=1e-6).to(F64)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_(0.0, 0.5)
    ours = normzoo.build("frn", 8, "conv", tlu=False).to(F64)
    ours.load_state_dict(theirs.state_dict())
    x = sample_input((4, 8, 5, 3), F64, 3, "conv")
    with timm_in_float64():
        expected = theirs(x)
    torch.testing.assert_close(torch.relu(ours(x)), expected, **TOLERANCE)


def test_evonorm_b0_cumulative_average_with_momentum_none():
    """``momentum=None`` (which timm lacks) averages the unbiased batch variances equally."""
    module = normzoo.build("evonorm-b0", 3, "conv", momentum=None).to(F64)
    batches = [sample_input((4, 3, 5, 5), F64, seed, "conv") for seed in range(3)]
    for x in batches:
        module(x)
    expected = torch.stack([x.var(dim=(0, 2, 3), correction=1) for x in batches]).mean(0)
    torch.testing.assert_close(module.running_var, expected, **TOLERANCE)
    assert int(module.num_batches_tracked) == 3


def test_switchnorm_without_batch_terms_is_per_example_in_training():
    """``using_bn=False`` mixes instance and layer statistics only: an example's training
    output does not depend on the rest of the batch, and nothing is tracked."""
    module = normzoo.build("switchnorm", 4, "conv", using_bn=False)
    x = sample_input((4, 4, 3, 3), seed=0)
    other = torch.cat([x[:1], sample_input((3, 4, 3, 3), seed=1)])
    torch.testing.assert_close(module(x)[0], module(other)[0], rtol=0, atol=0)
    assert [name for name, _ in module.named_buffers()] == ["num_batches_tracked"]


def test_switchnorm_mixture_weights_change_the_output_in_train_and_eval():
    """The mixture logits are used in both modes. The conformance check that every parameter
    is used adds ``0.5 + |p|`` to each element, which leaves equal logits (the authors' initial
    ones) equal, and a softmax of equal logits is unchanged: that check cannot see them. A
    perturbation that makes them unequal can."""
    module = normzoo.build("switchnorm", 4, "conv")
    x = sample_input((4, 4, 3, 3), seed=0)
    for training in (True, False):
        for name in ("mean_weight", "var_weight"):
            module.train(training)
            state = {k: v.clone() for k, v in module.state_dict().items()}
            with torch.no_grad():
                before = module(x)
                module.load_state_dict(state)
                getattr(module, name).add_(1.0)  # the check's shift: nothing changes
                assert torch.equal(module(x), before)
                module.load_state_dict(state)
                getattr(module, name)[0].add_(1.0)
                after = module(x)
                module.load_state_dict(state)
            assert not torch.allclose(after, before), (name, training)


@pytest.mark.parametrize(
    "options, num_features, message",
    [
        ({"groups": 4}, 6, "option 'groups' of norm 'evonorm-s0' must divide num_features=6, "
         "got 4; choose one of 1, 2, 3, 6"),
        ({"group_size": 4}, 6, "option 'group_size' of norm 'evonorm-s0' must divide "
         "num_features=6, got 4; choose one of 1, 2, 3, 6"),
        ({"groups": 32}, 16, "option 'groups' of norm 'evonorm-s0' must divide "
         "num_features=16, got 32; choose one of 1, 2, 4, 8, 16"),
    ],
)  # fmt: skip
def test_evonorm_s0_groups_are_checked_at_build_in_one_line(options, num_features, message):
    with pytest.raises(OptionError) as raised:
        normzoo.build("evonorm-s0", num_features, "conv", **options)
    assert str(raised.value) == message


def test_evonorm_s0_group_size_wins_over_groups_as_in_timm():
    module = normzoo.build("evonorm-s0", 12, "conv", groups=5, group_size=4)
    assert module.groups == 3 == EvoNorm2dS0(12, groups=5, group_size=4).groups


def test_switchnorm_rejects_a_single_position_per_example_in_both_modes():
    """The authors' unbiased instance variance of one value is 0/0; refused in one line."""
    module = normzoo.build("switchnorm", 3, "conv")
    for training in (True, False):
        with pytest.raises(ValueError, match=r"^norm 'switchnorm' needs more than 1 value"):
            module.train(training)(torch.randn(8, 3, 1, 1))


# --- conformance with other options, and the workloads --------------------------------------

#: (norm, options, num_features, checks left out and why)
CONFIGURED = [
    ("frn", {"tlu": False}, None, {}),
    ("evonorm-b0", {"momentum": None}, None, {}),
    ("evonorm-s0", {"group_size": 2}, 6, {}),
    ("evonorm-s0", {"groups": 4}, 8, {}),
    ("dyt", {"alpha_init": 2.0}, None, {}),
    (
        "switchnorm", {"using_bn": False}, None,
        {
            "train_eval": "per example in training without the batch terms, though declared "
            "with batch statistics (test_switchnorm_without_batch_terms_is_per_example...)",
            "batch_of_one": "the same: a batch of one is fine without batch terms",
        },
    ),
    (
        "switchnorm", {"last_gamma": True, "momentum": None}, None,
        {
            "train_eval": "weight 0: the output is the bias alone, in either mode",
            "eval_uses_parameters": "weight 0 hides every parameter before it",
        },
    ),
]  # fmt: skip


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
@pytest.mark.parametrize(
    "norm, options, num_features, left_out", CONFIGURED, ids=lambda v: str(v)[:40]
)
def test_conforms_with_options(norm, options, num_features, left_out, check):
    if check in left_out:
        pytest.skip(left_out[check])
    run_check(check, norm, options=options, num_features=num_features)


#: LeNet's slots are conv (6, 16 channels) and fc (120, 84): a norm without ``fc`` goes in the
#: conv slots with ``--placement conv``, as instancenorm does.
PLACEMENT = {"dyt": "all", "evonorm-s0": "all", "frn": "conv", "evonorm-b0": "conv",
             "switchnorm": "conv"}  # fmt: skip


@pytest.mark.parametrize("norm", NORMS)
def test_lenet_trains_a_step_with_each_and_fc_less_norms_name_the_placement(norm):
    if PLACEMENT[norm] == "conv":
        with pytest.raises(
            NormzooError, match=r"does not support layout 'fc'.*use --placement conv$"
        ):
            check_model_settings(ModelSettings(norm=norm))
    torch.manual_seed(0)
    model = build_model(ModelSettings(norm=norm, placement=PLACEMENT[norm]))
    images = sample_input((16, 1, 28, 28), seed=0)
    labels = torch.arange(16) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert torch.isfinite(model.eval()(images)).all()
