"""The conformance suite itself: each check fails on a norm that breaks its rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normzoo import NormInfo, Option, Registry
from normzoo.interface import check_input
from normzoo.testing import check_norm, run_check


class TextbookBatchNorm(nn.Module):
    """The book's class: running statistics in plain attributes, not buffers."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.moving_mean = torch.zeros(num_features)
        self.moving_var = torch.ones(num_features)
        self.dims = (0,) if layout == "fc" else (0, 2, 3)
        self.shape = (1, num_features) + (1, 1) * (layout == "conv")

    def forward(self, x):
        if self.training:
            mean = x.mean(dim=self.dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=self.dims, keepdim=True)
            self.moving_mean = 0.9 * self.moving_mean + 0.1 * mean.detach().reshape(-1)
            self.moving_var = 0.9 * self.moving_var + 0.1 * var.detach().reshape(-1)
        else:
            mean = self.moving_mean.reshape(self.shape)
            var = self.moving_var.reshape(self.shape)
        return self.gamma.reshape(self.shape) * (x - mean) / torch.sqrt(
            var + 1e-5
        ) + self.beta.reshape(self.shape)


class HalfPrecisionOutput(nn.Module):
    def __init__(self, num_features: int, layout: str):
        super().__init__()

    def forward(self, x):
        return x.half()


class WrongGradient(nn.Module):
    """Forward is x**2, backward claims x."""

    class _Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * x

    def __init__(self, num_features: int, layout: str):
        super().__init__()

    def forward(self, x):
        return self._Square.apply(x)


class RandomScale(nn.Module):
    def __init__(self, num_features: int, layout: str):
        super().__init__()

    def forward(self, x):
        return x * torch.rand(())


_SHARED_MEAN = torch.zeros(4)


class SharedRunningMean(nn.Module):
    """Keeps its running mean in a module-level tensor, so every instance shares it."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.register_buffer("running_mean", _SHARED_MEAN)

    def forward(self, x):
        check_input(x, 4, "fc" if x.dim() == 2 else "conv", "candidate")
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * x.detach().mean(dim=0).reshape(4, -1)[:, 0])
        return x - self.running_mean.reshape((1, 4) + (1,) * (x.dim() - 2))


class EvalForgetsAffine(nn.Module):
    """Applies its weight and bias in train mode only."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.shape = (1, num_features) + (1, 1) * (layout == "conv")
        self.layout = layout
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        check_input(x, self.shape[1], self.layout, "candidate")
        y = torch.tanh(x)
        if self.training:
            y = y * self.weight.reshape(self.shape) + self.bias.reshape(self.shape)
        return y


class AssumesContiguous(nn.Module):
    """Reads the raw storage as if the input were contiguous NCHW (wrong for channels_last)."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.layout, self.num_features = layout, num_features
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x):
        check_input(x, self.num_features, self.layout, "candidate")
        flat = torch.as_strided(x, (x.numel(),), (1,))
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        return flat.reshape(x.shape) * self.weight.reshape(shape)


class UncheckedShape(nn.Module):
    """Broadcasts whatever it is given: a wrong input shape passes silently."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def registry_with(factory, uses_batch_stats: bool) -> Registry:
    registry = Registry(entry_points=False)
    registry.register(
        NormInfo(
            name="candidate",
            summary="a norm under test",
            layouts=("fc", "conv"),
            uses_batch_stats=uses_batch_stats,
            factory=factory,
        )  # fmt: skip
    )
    return registry


@pytest.mark.parametrize(
    "factory, uses_batch_stats, check, message",
    [
        (TextbookBatchNorm, True, "to_moves_state", "plain attributes"),
        (TextbookBatchNorm, True, "state_dict_round_trip", "state_dict round trip"),
        (TextbookBatchNorm, True, "batch_of_one", "batch of one was accepted"),
        (
            TextbookBatchNorm,
            False,
            "train_eval",
            "uses_batch_stats=False, yet train output depends",
        ),
        (nn.Identity, True, "train_eval", "uses_batch_stats=True, yet train output ignores"),
        (HalfPrecisionOutput, False, "shape_and_dtype", "output dtype torch.float16"),
        (WrongGradient, False, "gradcheck", "gradcheck failed"),
        (RandomScale, False, "deterministic", "eval is not repeatable"),
        (SharedRunningMean, True, "instances_are_independent", "module-level tensor"),
        (EvalForgetsAffine, False, "eval_uses_parameters", "does not change the eval-mode"),
        (AssumesContiguous, False, "memory_format", "non-contiguous input"),
        (UncheckedShape, False, "rejects_wrong_shapes", "wrong shape was accepted"),
        (nn.BatchNorm2d, True, "rejects_wrong_shapes", "instead of a ValueError"),
    ],
)
def test_check_fails_on_a_norm_that_breaks_its_rule(factory, uses_batch_stats, check, message):
    registry = registry_with(factory, uses_batch_stats)
    with pytest.raises(AssertionError, match=message):
        run_check(check, "candidate", registry)


class CheckedTorchBatchNorm(nn.Module):
    """torch's batch norm as a third party would wrap it: with normzoo's input check."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.num_features, self.layout = num_features, layout
        self.norm = (nn.BatchNorm1d if layout == "fc" else nn.BatchNorm2d)(num_features)

    def forward(self, x):
        check_input(x, self.num_features, self.layout, "candidate")
        return self.norm(x)


def test_every_check_passes_on_torch_batch_norm_wrapped_as_a_third_party_would():
    check_norm("candidate", registry_with(CheckedTorchBatchNorm, True))


def test_options_and_channel_counts_reach_every_build():
    seen = []

    def factory(num_features, layout, groups):
        seen.append((num_features, layout, groups))
        return CheckedTorchBatchNorm(num_features, layout)

    registry = Registry(entry_points=False)
    registry.register(
        NormInfo(
            name="candidate", summary="a norm under test", layouts=("fc", "conv"),
            uses_batch_stats=True, factory=factory,
            options=(Option("groups", int, 1, "groups"),),
        )
    )  # fmt: skip
    run_check("shape_and_dtype", "candidate", registry, options={"groups": 3}, num_features=6)
    assert seen and all(entry == (6, entry[1], 3) for entry in seen)
    assert {layout for _, layout, _ in seen} == {"fc", "conv"}
