"""`normzoo covariance`: the rank and conditioning of each norm layer's batch covariance, checked
against numpy's matrix_rank and cond, and measured on a trained run's model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from normzoo.cli import main
from normzoo.harness.config import RunConfig
from normzoo.harness.covariance import measure, named_norms, spectrum
from normzoo.harness.experiment import restore
from normzoo.workloads.data import load_fashion_mnist
from normzoo.workloads.slots import build_model


@pytest.mark.parametrize("samples", [8, 16, 200])
def test_rank_and_condition_equal_numpy(samples):
    generator = np.random.default_rng(samples)
    mixing = generator.normal(size=(20, 20)) * np.linspace(0.01, 3, 20)  # unequal scales
    features = generator.normal(size=(samples, 20)) @ mixing
    centred = features - features.mean(axis=0)
    covariance = centred.T @ centred / samples
    eps = 1e-5
    rank, condition, group = spectrum(torch.from_numpy(features), eps, group_size=8)
    assert rank == np.linalg.matrix_rank(covariance) == min(20, samples - 1)
    assert condition == pytest.approx(np.linalg.cond(covariance + eps * np.eye(20)), rel=1e-6)
    groups = [covariance[i : i + 8, i : i + 8] for i in (0, 8, 16)]  # the last has 4 channels
    expected = max(np.linalg.cond(g + eps * np.eye(len(g))) for g in groups)
    assert group == pytest.approx(expected, rel=1e-6)


def test_a_fully_connected_layer_has_rank_below_the_batch_and_a_conv_layer_does_not():
    config = RunConfig(norm="zca", norm_options={"group_size": 120})
    torch.manual_seed(0)
    model = build_model(config)
    data = load_fashion_mnist().subset(512, 10)
    spectra = measure(model, named_norms(model, config), data.train, [16, 256], 2, 16)
    found = {(s.layer, s.batch_size): s for s in spectra}
    assert [name for name, _ in named_norms(model, config)] == ["conv1", "conv2", "fc1", "fc2"]
    assert found["fc1", 16].samples == 16 and found["fc1", 16].rank == 15
    assert found["fc1", 256].rank == found["fc1", 256].rank_bound == 120
    assert found["conv1", 16].samples == 16 * 24 * 24 and found["conv1", 16].rank == 6


def test_the_command_reads_a_run_and_writes_its_table(tmp_path, capsys):
    runs = tmp_path / "runs"
    settings = ["--norm", "zca", "--epochs", "1", "--train-subset", "512", "--test-subset", "64",
                "--runs-dir", str(runs), "--no-progress"]  # fmt: skip
    assert main(["run", *settings]) == 0
    (directory,) = runs.iterdir()
    config, model, _ = restore(directory, torch.device("cpu"))
    saved = torch.load(directory / "model.pt")
    assert config.norm == "zca" and all(
        torch.equal(saved[name], value) for name, value in model.state_dict().items()
    )
    capsys.readouterr()
    assert main(["covariance", str(directory), "--batch-size", "16", "--batches", "2"]) == 0
    shown = capsys.readouterr().out
    assert "| fc1 | 120 | 16 | 16 | 15 (15) |" in shown
    stored = json.loads((directory / "covariance.json").read_text())
    assert stored["batches"] == 2 and len(stored["spectra"]) == 4


def test_a_directory_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["covariance", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "has no config.json" in error and "normzoo run" in error


def test_more_batches_than_the_data_holds_is_one_line(tmp_path):
    config = RunConfig(norm="zca")
    model = build_model(config)
    data = load_fashion_mnist().subset(100, 10)
    with pytest.raises(Exception, match="need 2560 examples; the split has 100"):
        measure(model, named_norms(model, config), data.train, [256], 10, 16)
