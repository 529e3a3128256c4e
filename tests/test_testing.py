"""The conformance suite itself: each check fails on a norm that breaks its rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normzoo import NormInfo, Registry
from normzoo.testing import run_check


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
    ],
)
def test_check_fails_on_a_norm_that_breaks_its_rule(factory, uses_batch_stats, check, message):
    registry = registry_with(factory, uses_batch_stats)
    with pytest.raises(AssertionError, match=message):
        run_check(check, "candidate", registry)


def test_every_check_passes_on_torch_batch_norm_wrapped_as_a_third_party_would():
    registry = registry_with(
        lambda num_features, layout: (nn.BatchNorm1d if layout == "fc" else nn.BatchNorm2d)(
            num_features
        ),
        True,
    )
    from normzoo.testing import check_norm

    check_norm("candidate", registry)
