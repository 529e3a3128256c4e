"""The LeNet harness end to end on a data subset: real training, real files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

import normzoo
from normzoo.compare.cache import resolved_config, run_key
from normzoo.harness.config import RunConfig
from normzoo.harness.launch import launch
from normzoo.harness.train import batch_bounds, reestimate_running_stats
from normzoo.workloads.data import Split

from .conftest import lenet

SMALL = dict(epochs=3, train_subset=4096, test_subset=1000, device="cpu")


def test_lenet_has_a_norm_after_every_conv_and_hidden_fc_layer():
    model = lenet("batchnorm")
    norms = [m for m in model if type(m).__name__ == "BatchNorm"]
    assert [(n.num_features, n.layout) for n in norms] == [
        (6, "conv"),
        (16, "conv"),
        (120, "fc"),
        (84, "fc"),
    ]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "placement, expected", [("conv", [6, 16]), ("fc", [120, 84]), ("none", [])]
)
def test_placement_selects_the_normalized_layers(placement, expected):
    model = lenet("torch-batchnorm", placement=placement)
    assert [
        m.num_features for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ] == expected


def test_options_activation_bias_and_dropout():
    model = lenet("layernorm", activation="relu", bias_before_norm=False, dropout=0.5)
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [m.bias is None for m in layers] == [True, True, True, True, False]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 4
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_bad_model_options_are_named():
    with pytest.raises(
        normzoo.NormzooError, match="unknown activation 'tanh'; valid activations: relu, sigmoid"
    ):
        lenet(activation="tanh")
    with pytest.raises(normzoo.UnknownNormError):
        lenet("nope", placement="none")


def test_short_training_run_learns_and_saves_everything(tmp_path):
    result = launch(RunConfig(norm="batchnorm", runs_dir=str(tmp_path), **SMALL), progress=False)
    assert result.status == "finished"
    assert len(result.epochs) == 3 and result.epochs[-1].test_acc > 0.5  # chance is 0.1
    assert all(m.examples_per_sec > 0 for m in result.epochs)
    path = result.directory.path
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert [row["test_acc"] for row in metrics["epochs"]] == [m.test_acc for m in result.epochs]
    config = json.loads((path / "config.json").read_text())
    assert config["config"]["norm"] == "batchnorm" and config["train_examples"] == 4096
    assert {"eps": 1e-5, "momentum": 0.1}.items() <= config["resolved_norm_options"].items()
    assert (path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    restored = lenet("batchnorm")
    restored.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    assert not list(path.glob(".*.tmp"))


def test_same_seed_gives_the_same_numbers(tmp_path):
    config = RunConfig(
        norm="layernorm", runs_dir=str(tmp_path), epochs=1, train_subset=1000, test_subset=500
    )
    first = launch(config, progress=False).epochs[0]
    second = launch(config, progress=False).epochs[0]
    assert (first.train_loss, first.test_acc) == (second.train_loss, second.test_acc)


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("c++", "g++", "clang++")),
    reason="torch.compile on a CPU needs a C++ compiler",
)
def test_compiled_training_steps_give_the_eager_numbers(tmp_path):
    """``--compile`` changes how the steps run, not what they compute: the same run, compiled,
    agrees with the eager one up to float rounding, and shares its comparison key."""
    from torch._dynamo.utils import counters

    config = RunConfig(
        norm="batchnorm", runs_dir=str(tmp_path), epochs=1, train_subset=1024, test_subset=512,
        lr=0.1, device="cpu",
    )  # fmt: skip
    eager = launch(config, progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = launch(replace(config, compile=True), progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # the steps did run through torch.compile
    assert compiled.epochs[0].train_loss == pytest.approx(eager.epochs[0].train_loss, rel=1e-4)
    assert abs(compiled.epochs[0].test_acc - eager.epochs[0].test_acc) <= 2 / 512
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], value, rtol=1e-3, atol=1e-4)
    assert run_key(resolved_config(replace(config, compile=True))) == run_key(
        resolved_config(config)
    )


def test_compile_refuses_several_processes(tmp_path):
    with pytest.raises(normzoo.NormzooError, match="--compile.*--nproc 2"):
        launch(RunConfig(compile=True, nproc=2, runs_dir=str(tmp_path)), progress=False)


class ExplodesInSecondEpoch(nn.Module):
    """A deliberately unstable norm: returns inf once it has seen 4 training batches."""

    def __init__(self, num_features: int, layout: str):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x * float("inf") if self.calls > 4 else x


def test_divergence_stops_the_run_and_keeps_finished_epochs(tmp_path):
    info = normzoo.NormInfo(
        name="explodes", summary="becomes infinite", layouts=("fc", "conv"),
        uses_batch_stats=False, factory=ExplodesInSecondEpoch,
    )  # fmt: skip
    config = RunConfig(
        norm="explodes", placement="fc", runs_dir=str(tmp_path), epochs=3,
        train_subset=1000, test_subset=200, batch_size=256,
    )  # fmt: skip
    with normzoo.register(info):
        result = launch(config, progress=False)
    assert result.status == "diverged"
    assert "epoch 2" in result.message and "'explodes'" in result.message
    metrics = json.loads((result.directory.path / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and len(metrics["epochs"]) == 1
    assert not (result.directory.path / "model.pt").exists()


def test_bad_run_settings_are_named(tmp_path):
    with pytest.raises(normzoo.NormzooError, match="lr must be > 0, got -1"):
        launch(RunConfig(lr=-1, runs_dir=str(tmp_path)), progress=False)
    with pytest.raises(normzoo.NormzooError, match="unknown device 'gpu0'"):
        launch(RunConfig(device="gpu0", runs_dir=str(tmp_path)), progress=False)
    assert not list(tmp_path.iterdir())


def test_interrupted_run_keeps_the_finished_epochs(tmp_path):
    def interrupt_after_first(metrics):
        raise KeyboardInterrupt

    config = RunConfig(
        norm="none", runs_dir=str(tmp_path), epochs=3, train_subset=500, test_subset=100
    )
    with pytest.raises(KeyboardInterrupt):
        launch(config, progress=False, on_epoch=interrupt_after_first)
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and len(metrics["epochs"]) == 1
    assert (run_dir / "curves.png").exists()


def test_incomplete_last_batch_is_dropped_and_too_few_examples_are_named(tmp_path):
    assert batch_bounds(600, 256) == [(0, 256), (256, 512)]
    config = RunConfig(runs_dir=str(tmp_path), epochs=1, train_subset=100, batch_size=256)
    with pytest.raises(normzoo.NormzooError, match="100 examples, fewer than one batch of 256"):
        launch(config, progress=False)
    assert not list(tmp_path.iterdir())


def test_precise_stats_replaces_running_averages_by_the_mean_over_batches():
    """Independent reference: the plain mean of per-batch statistics, computed by hand."""
    torch.manual_seed(0)
    model = lenet("torch-batchnorm")
    images = torch.rand(64, 1, 28, 28)
    split = Split(images, torch.zeros(64, dtype=torch.long))
    first_norm = model[1]
    first_norm.running_mean.fill_(5.0)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        conv_out = model[0](images[order][:48]).reshape(3, 16, 6, 24, 24)
    expected = conv_out.mean(dim=(1, 3, 4)).mean(dim=0)
    assert reestimate_running_stats(model, split, 16, 3, generator) == 4
    torch.testing.assert_close(first_norm.running_mean, expected)
    assert first_norm.momentum == 0.1


def test_precise_stats_keeps_dropout_off_and_skips_norms_without_the_capability():
    """Re-estimation runs only the norms in train mode: with dropout 0.5 the statistics come out
    the same on every call (train-mode dropout would draw new masks), and equal those of the
    same weights without dropout layers. A module with a float ``momentum`` that is no
    NormBase is not touched: the capability is declared, not guessed."""

    class MomentumButNoCapability(nn.Module):
        def __init__(self):
            super().__init__()
            self.momentum = 0.1
            self.register_buffer("running_mean", torch.full((3,), 7.0))

        def forward(self, x):
            return x

    torch.manual_seed(0)
    with_dropout = lenet("batchnorm", dropout=0.5)
    without = lenet("batchnorm")
    values = with_dropout.state_dict().values()  # the same tensors, other Sequential indices
    without.load_state_dict(dict(zip(without.state_dict(), values, strict=True)))
    images = torch.rand(64, 1, 28, 28)
    split = Split(images, torch.zeros(64, dtype=torch.long))
    results = []
    for model in (with_dropout, with_dropout, without):
        reestimate_running_stats(model, split, 16, 3, torch.Generator().manual_seed(3))
        results.append([norm.running_mean.clone() for norm in model if hasattr(norm, "eps")])
    for first, again, reference in zip(*results, strict=True):
        assert torch.equal(first, again)
        torch.testing.assert_close(first, reference)
    bystander = MomentumButNoCapability()
    assert reestimate_running_stats(nn.Sequential(bystander), split, 16, 3, torch.Generator()) == 0
    assert torch.equal(bystander.running_mean, torch.full((3,), 7.0))


def freezable(info: normzoo.NormInfo) -> bool:
    """Whether a LeNet with ``info``'s norm in every slot has only gamma and beta to learn in
    its norms: the norm fills the fc slots, and ``affine=False`` (or its absence) leaves it
    no parameter (a fresh layer tells)."""
    if "fc" not in info.layouts:
        return False
    options = {"affine": False} if info.has_option("affine") else {}
    return not any(True for _ in normzoo.build(info.name, 8, "fc", **options).parameters())


def test_the_norms_whose_affine_option_removes_every_parameter_are_freezable():
    """The specification the two tests below split on: these must freeze."""
    expected = {"batchnorm", "torch-batchnorm", "layernorm", "groupnorm", "rmsnorm", "zca",
                "iternorm", "pit", "cholesky-whitening", "pca-whitening"}  # fmt: skip
    assert expected <= {n.name for n in normzoo.available() if freezable(n)}


@pytest.mark.parametrize("norm", [n.name for n in normzoo.available() if freezable(n)])
def test_freeze_affine_leaves_the_norms_without_learnable_parameters(norm):
    model = lenet(norm, freeze_affine=True)
    lenet_layers = (nn.Conv2d, nn.Linear)
    norm_parameters = [
        name
        for name, module in model.named_modules()
        if not isinstance(module, lenet_layers)
        for name, _ in module.named_parameters(recurse=False)
    ]
    assert norm_parameters == []
    assert all(
        getattr(module, "affine", False) is False for module in model if hasattr(module, "eps")
    )


def test_freeze_affine_trains_with_gamma_one_and_beta_zero_and_is_recorded(tmp_path):
    config = RunConfig(
        norm="batchnorm", epochs=1, train_subset=1024, test_subset=256, precise_stats=2,
        freeze_affine=True, runs_dir=str(tmp_path),
    )  # fmt: skip
    result = launch(config, progress=False)
    saved = json.loads((result.directory.path / "config.json").read_text())
    assert saved["config"]["freeze_affine"] is True
    assert saved["resolved_norm_options"]["affine"] is False
    weights = torch.load(result.directory.path / "model.pt", weights_only=True)
    assert "1.weight" not in weights and "1.running_mean" in weights


def test_freeze_affine_refuses_a_norm_it_cannot_freeze_and_a_contradiction(tmp_path):
    class Scale(nn.Module):
        def __init__(self, num_features, layout):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(num_features))

        def forward(self, x):
            return x

    info = normzoo.NormInfo(
        name="scale-only", summary="a scale", layouts=("fc", "conv"), uses_batch_stats=False,
        factory=Scale,
    )  # fmt: skip
    with normzoo.register(info):
        with pytest.raises(normzoo.NormzooError, match="--freeze-affine needs a norm whose"):
            lenet("scale-only", freeze_affine=True)
    with pytest.raises(normzoo.NormzooError, match="contradicts --norm-opt affine=true"):
        lenet("batchnorm", {"affine": "true"}, freeze_affine=True)


def test_a_norm_without_lenets_fc_layout_says_which_placement_works():
    message = "does not support layout 'fc'.*--placement conv"
    with pytest.raises(normzoo.NormzooError, match=message):
        lenet("instancenorm")
    assert lenet("instancenorm", placement="conv") is not None


def test_a_norm_outside_normbase_declares_the_reestimation_capability():
    class CountingMean(nn.Module):
        reestimable = True  # the declaration; the contract: reset_running_stats, momentum=None

        def __init__(self):
            super().__init__()
            self.momentum = 0.1
            self.register_buffer("running_mean", torch.full((1,), 50.0))
            self.register_buffer("count", torch.zeros(()))

        def reset_running_stats(self):
            self.running_mean.zero_()
            self.count.zero_()

        def forward(self, x):
            if self.training:
                self.count += 1
                weight = 1 / self.count if self.momentum is None else self.momentum
                self.running_mean.lerp_(x.mean().reshape(1), float(weight))
            return x

    norm = CountingMean()
    images = torch.arange(48.0).reshape(48, 1, 1, 1)
    split = Split(images, torch.zeros(48, dtype=torch.long))
    assert reestimate_running_stats(nn.Sequential(norm), split, 16, 3, torch.Generator()) == 1
    torch.testing.assert_close(norm.running_mean, images.mean().reshape(1))
    assert norm.momentum == 0.1


@pytest.mark.parametrize("norm", [n.name for n in normzoo.available() if not freezable(n)])
def test_freeze_affine_refuses_a_norm_that_learns_more_than_gamma_and_beta(norm):
    with pytest.raises(normzoo.NormzooError) as raised:
        lenet(norm, freeze_affine=True)
    assert "\n" not in str(raised.value) and repr(norm) in str(raised.value)
