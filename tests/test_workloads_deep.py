"""The deeper bundled workloads, ``resnet`` and ``transformer``: registered through the
entry-point group, every norm that fits their slots builds and trains a step, the slots are
what the models feed their norms, the models are deterministic given the seed, and ``run``
trains them on a train subset. Tiny batches throughout: the file runs in well under a minute
on one thread."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import normzoo
from normzoo import registry
from normzoo.bench import BenchConfig, format_table, run_bench
from normzoo.bench.timing import BASELINE, baseline_of
from normzoo.cli import main
from normzoo.testing import check_workload
from normzoo.workloads.slots import ModelSettings, build_model, norm_modules

WORKLOADS = ("resnet", "transformer")
#: The layout of every slot of each workload.
LAYOUT = {"resnet": "conv", "transformer": "seq"}
NORMS = tuple(info.name for info in registry.available())


def test_both_come_through_the_entry_point_group_with_their_declared_slots():
    records = {record.name: record for record in normzoo.plugins()}
    for name in WORKLOADS:
        assert records[name].workloads == [name] and records[name].builtin
        assert records[name].norms == []
        assert normzoo.workload(name).layouts == (LAYOUT[name],)
    resnet = normzoo.workload("resnet").slots
    assert len(resnet) == 15 and resnet[0].name == "stem"
    assert [s.name for s in resnet if s.name.endswith("shortcut")] == [
        "s2b1_shortcut", "s3b1_shortcut"
    ]  # fmt: skip
    assert sorted({(s.channels, s.spatial) for s in resnet}) == [
        (16, (28, 28)), (32, (14, 14)), (64, (7, 7))
    ]  # fmt: skip
    transformer = normzoo.workload("transformer").slots
    assert [s.name for s in transformer] == [
        "block1_attn", "block1_mlp", "block2_attn", "block2_mlp", "final"
    ]  # fmt: skip
    assert {(s.channels, s.spatial) for s in transformer} == {(64, (16,))}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_norm_with_the_layout_builds_and_trains_a_step(workload, norm):
    layouts = registry.info(norm).layouts
    if LAYOUT[workload] not in layouts:
        pytest.skip(
            f"{norm} lacks layout {LAYOUT[workload]!r} ({workload}'s slots); it supports "
            f"{', '.join(layouts)}"
        )
    check_workload(workload, norms=[norm], batch_size=8)


@pytest.mark.parametrize("workload, norm", [("resnet", "batchnorm"), ("transformer", "layernorm")])
def test_each_norm_sees_its_slots_shape_in_the_slots_order(workload, norm):
    torch.manual_seed(0)
    model = build_model(ModelSettings(workload=workload, norm=norm))
    shapes = []
    for _, module in norm_modules(model):
        module.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    model(torch.rand(2, 1, 28, 28))
    assert shapes == [slot.input_shape(2) for slot in normzoo.workload(workload).slots]


@pytest.mark.parametrize(
    "workload, norm, parameters",
    [("resnet", "batchnorm", 175_530), ("transformer", "layernorm", 71_946)],
)
def test_the_parameter_counts_are_those_the_docs_print(workload, norm, parameters):
    model = build_model(ModelSettings(workload=workload, norm=norm))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_the_resnet_adds_the_residual_before_the_blocks_last_activation():
    model = build_model(ModelSettings(workload="resnet", norm="batchnorm", activation="relu"))
    block = model[3]  # stage 1, block 1: identity shortcut
    assert isinstance(block.shortcut, nn.Identity) and isinstance(block.activation, nn.ReLU)
    assert not isinstance(block.branch[-1], nn.ReLU)  # the branch ends with conv2's norm
    x = torch.randn(2, 16, 28, 28)
    assert torch.equal(block(x), torch.relu(block.branch(x) + x))
    projection = model[5]  # stage 2, block 1: 1x1 stride-2 conv and its norm, no activation
    assert [type(m).__name__ for m in projection.shortcut] == ["Conv2d", "BatchNorm"]


def test_the_transformer_pre_norm_slots_have_no_activation_and_placement_none_no_norm():
    model = build_model(ModelSettings(workload="transformer", norm="layernorm"))
    assert len(model.blocks[0].attn_norm) == 1  # the norm alone, no sigmoid after it
    bare = build_model(ModelSettings(workload="transformer", norm="layernorm", placement="none"))
    assert norm_modules(bare) == [] and len(bare.blocks[0].attn_norm) == 0
    assert bare(torch.rand(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_the_model_is_deterministic_given_the_seed(workload):
    images = torch.rand(4, 1, 28, 28)

    def built(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(seed)
        model = build_model(ModelSettings(workload=workload, norm="batchnorm"))
        return model.state_dict(), model(images)

    (first, logits), (again, logits_again), (other, _) = built(3), built(3), built(4)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert torch.equal(logits, logits_again)
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("workload, norm", [("resnet", "groupnorm"), ("transformer", "rmsnorm")])
def test_run_trains_the_workload_on_its_train_subset(workload, norm, tmp_path, capsys):
    argv = ["run", "--workload", workload, "--norm", norm, "--epochs", "1", "--train-subset",
            "64", "--batch-size", "32", "--test-subset", "32", "--precise-stats", "1",
            "--no-progress", "--runs-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (directory,) = tmp_path.iterdir()
    record = json.loads((directory / "config.json").read_text())
    assert record["config"]["workload"] == workload and record["config"]["train_subset"] == 64
    # no --lr or --activation given: the workload's declared defaults, not LeNet's
    declared = normzoo.workload(workload).defaults
    assert {key: record["config"][key] for key in declared} == declared
    assert record["config"]["batch_size"] == 32  # what the command line gives wins
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    (epoch,) = metrics["epochs"]
    assert round(epoch["examples_per_sec"] * epoch["seconds"]) == 64  # 2 batches of 32
    assert (directory / "model.pt").exists()


def test_bench_times_the_transformer_against_layer_norm_and_the_resnet_against_torchs_bn():
    assert baseline_of("transformer") == "layernorm" and baseline_of("resnet") == BASELINE
    config = BenchConfig(
        workload="transformer", norms=("rmsnorm",), cases=("final-eval",), quick=True, threads=1
    )
    (result,) = run_bench(config)
    assert result.case == "final-eval" and result.ratio > 0
    assert "baseline layernorm in the same rounds" in format_table([result], config)


def test_bench_times_each_workloads_model_as_a_run_builds_it():
    """With the workload's declared defaults: the resnet's ReLU, not LeNet's sigmoid."""
    from normzoo.bench.timing import workload_model

    activations = {type(module) for module in workload_model("resnet", "batchnorm").modules()}
    assert nn.ReLU in activations and nn.Sigmoid not in activations
    assert nn.Sigmoid in {type(module) for module in workload_model("lenet", "batchnorm").modules()}
