"""How a run ends when something goes wrong: bad norms are caught by a trial batch before the
run directory exists; once it exists, ``metrics.json`` always ends with a final status."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

import normzoo
from normzoo.harness.config import RunConfig
from normzoo.harness.experiment import RunResult
from normzoo.harness.group import resolve_device
from normzoo.harness.interrupts import RunInterrupted
from normzoo.harness.launch import launch
from normzoo.harness.train import (
    NormProbeError,
    TrainingDiverged,
    TrainingFailed,
    accuracy,
    check_finite_buffers,
    probe_norms,
)
from normzoo.workloads.data import Split
from normzoo.workloads.slots import norm_modules

from .conftest import lenet

# placement "fc": LeNet's children 8 and 11 are the norms, after fc 256->120 and fc 120->84
TINY = dict(placement="fc", epochs=3, train_subset=768, test_subset=100, precise_stats=0)


def declare(name: str, factory, layouts=("fc", "conv")) -> normzoo.NormInfo:
    return normzoo.NormInfo(
        name=name, summary=f"test norm {name}", layouts=layouts, uses_batch_stats=False,
        factory=factory,
    )  # fmt: skip


class MeanOverBatch(nn.Module):
    """Returns the batch mean: shape (1, C) for (N, C), which later layers would broadcast."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=0, keepdim=True)


class DividesByZero(nn.Module):
    """A norm whose arithmetic is broken (here: it divides by zero), not its learning rate."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=0)) / torch.zeros_like(x)


class Raises(nn.Module):
    """Raises a multi-line error in the given mode from its ``calls``-th call in that mode."""

    mode = "train"
    after = 0

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training == (self.mode == "train"):
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError("plugin bug\nsecond line of a long torch-style message")
        return x


class RaisesInEval(Raises):
    mode = "eval"


class RaisesInSecondEpoch(Raises):
    after = 3  # 768 examples: 3 batches of 256 per epoch


class NaNStatsInSecondEpoch(nn.Module):
    """Keeps a running statistic that turns NaN in epoch 2 while its output stays finite."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls > 3:
                self.running_mean.fill_(math.nan)
        return x


class NaNWhenReestimated(nn.BatchNorm1d):
    """torch's batch norm, whose running mean turns NaN when precise stats re-estimate it
    (they change ``momentum`` from the 0.1 it is built with)."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and self.momentum != 0.1:
            self.running_mean.fill_(math.nan)
        return out


class InterruptsWhenSaved(nn.Module):
    """Sends this process a real SIGINT when its weights are saved: Ctrl-C during the final
    save."""

    saved = 0

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        type(self).saved += 1
        os.kill(os.getpid(), signal.SIGINT)
        return super().state_dict(*args, **kwargs)


def run(tmp_path, norm: str, factory, **settings) -> RunResult:
    config = RunConfig(norm=norm, runs_dir=str(tmp_path / "runs"), **{**TINY, **settings})
    with normzoo.register(declare(norm, factory)):
        return launch(config, progress=False)


def metrics_of(tmp_path) -> dict:
    (run_dir,) = (tmp_path / "runs").iterdir()
    return json.loads((run_dir / "metrics.json").read_text())


def test_lenet_records_its_norms_by_name():
    model = lenet("torch-batchnorm", placement="fc")
    assert [name for name, _ in norm_modules(model)] == ["8", "11"]
    assert [module for _, module in norm_modules(model)] == [model[8], model[11]]
    # the names are not in the state dict: files saved by normzoo 0.1.0 still load
    assert not any("normzoo" in key for key in model.state_dict())


@pytest.mark.parametrize(
    "norm, factory, expected",
    [
        (
            "mean-over-batch", MeanOverBatch,
            ["norm 'mean-over-batch' (module '8') returned shape (1, 120)",
             "for input (256, 120) in train mode"],
        ),
        (  # reported as "try a smaller --lr" before the trial batch checked for it
            "divides-by-zero", DividesByZero,
            ["norm 'divides-by-zero' (module '8') returned NaN or infinite values",
             "a smaller --lr cannot help"],
        ),
    ],
    ids=["changes-the-shape", "non-finite-output"],
)  # fmt: skip
def test_a_norm_with_a_wrong_output_fails_before_the_run_directory_exists(
    tmp_path, norm, factory, expected
):
    with pytest.raises(NormProbeError) as caught:
        run(tmp_path, norm, factory)
    message = str(caught.value)
    assert all(part in message for part in expected) and "\n" not in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "factory, mode", [(Raises, "train"), (RaisesInEval, "eval")], ids=["train", "eval"]
)
def test_a_norm_that_raises_is_named_with_the_original_as_cause(tmp_path, factory, mode):
    with pytest.raises(NormProbeError) as caught:
        run(tmp_path, "raises", factory)
    message = str(caught.value)
    assert f"norm 'raises' (module '8') failed on input (256, 120) in {mode} mode" in message
    assert message.endswith("RuntimeError: plugin bug") and "\n" not in message
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("norm", ["batchnorm", "torch-batchnorm"])
def test_batch_size_one_with_batch_statistics_fails_in_the_trial_batch(tmp_path, norm):
    config = RunConfig(norm=norm, batch_size=1, runs_dir=str(tmp_path), **TINY)
    with pytest.raises(NormProbeError, match=f"norm '{norm}' .*--batch-size 1") as caught:
        launch(config, progress=False)
    assert caught.value.__cause__ is not None
    assert not list(tmp_path.iterdir())


def test_a_factory_that_raises_is_one_error_naming_the_norm(tmp_path):
    def factory(num_features: int, layout: str) -> nn.Module:
        raise TypeError("factory bug")

    with pytest.raises(normzoo.NormzooError, match="norm 'bad-factory'.*factory bug") as caught:
        run(tmp_path, "bad-factory", factory)
    assert isinstance(caught.value.__cause__, TypeError)
    assert not (tmp_path / "runs").exists()


def test_the_probe_leaves_the_model_and_the_random_streams_alone():
    torch.manual_seed(0)
    model = lenet("torch-batchnorm", dropout=0.5)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    split = Split(torch.rand(32, 1, 28, 28), torch.zeros(32, dtype=torch.long))
    rng = torch.random.get_rng_state()
    probe_norms(model, split, 16, "torch-batchnorm")
    assert torch.equal(torch.random.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_an_error_after_the_directory_exists_ends_as_failed(tmp_path):
    with pytest.raises(TrainingFailed) as caught:
        run(tmp_path, "fails-later", RaisesInSecondEpoch)
    assert str(caught.value) == (
        "training with norm 'fails-later' failed in epoch 2: RuntimeError: plugin bug"
    )
    assert isinstance(caught.value.__cause__, RuntimeError)
    metrics = metrics_of(tmp_path)
    assert metrics["status"] == "failed" and metrics["message"] == str(caught.value)
    assert len(metrics["epochs"]) == 1


def test_any_exception_is_recorded_as_failed_and_re_raised(tmp_path):
    def broken_callback(metrics):
        raise ValueError("callback broke")

    config = RunConfig(norm="none", runs_dir=str(tmp_path / "runs"), **TINY)
    with pytest.raises(ValueError, match="callback broke"):
        launch(config, progress=False, on_epoch=broken_callback)
    metrics = metrics_of(tmp_path)
    assert (metrics["status"], metrics["message"]) == ("failed", "ValueError: callback broke")


def test_non_finite_running_statistics_end_the_run_as_diverged(tmp_path):
    result = run(tmp_path, "nan-stats", NaNStatsInSecondEpoch)
    assert result.status == "diverged"
    assert result.message.startswith(
        "running statistics of '8' (nan-stats) became non-finite in epoch 2"
    )
    metrics = metrics_of(tmp_path)
    assert metrics["status"] == "diverged" and metrics["message"] == result.message
    assert len(metrics["epochs"]) == 1
    assert not (result.directory.path / "model.pt").exists()


def test_non_finite_statistics_after_re_estimation_end_the_run_as_diverged(tmp_path):
    result = run(tmp_path, "nan-reestimated", NaNWhenReestimated, precise_stats=2)
    assert result.status == "diverged"
    assert "running statistics of '8' (nan-reestimated) became non-finite" in result.message
    assert "re-estimating" in result.message and "epoch 1" in result.message
    assert metrics_of(tmp_path)["status"] == "diverged"


def test_check_finite_buffers_names_a_module_that_is_not_a_norm():
    model = lenet("none", placement="none")
    model[0].register_buffer("scale", torch.tensor([1.0, math.inf]))
    with pytest.raises(TrainingDiverged, match=r"^running statistics of '0' \(Conv2d\)"):
        check_finite_buffers(model, "none", "in epoch 1")


def test_ctrl_c_during_the_final_save_still_finishes_the_run(tmp_path):
    InterruptsWhenSaved.saved = 0
    try:
        result = run(tmp_path, "interrupts-when-saved", InterruptsWhenSaved, epochs=1)
    except KeyboardInterrupt:
        pytest.fail("SIGINT during the final save was not held off")
    assert InterruptsWhenSaved.saved >= 1  # the signal was really sent
    assert result.status == "finished"
    assert metrics_of(tmp_path)["status"] == "finished"
    assert (result.directory.path / "model.pt").exists()


def test_interrupt_carries_the_directory_and_restores_the_sigterm_handler(tmp_path):
    def interrupt(metrics):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C, as the terminal sends it

    before = signal.getsignal(signal.SIGTERM)
    config = RunConfig(norm="none", runs_dir=str(tmp_path / "runs"), **TINY)
    with pytest.raises(RunInterrupted) as caught:
        launch(config, progress=False, on_epoch=interrupt)
    assert signal.getsignal(signal.SIGTERM) is before
    assert caught.value.signal_number == signal.SIGINT
    assert caught.value.directory == next((tmp_path / "runs").iterdir())
    metrics = metrics_of(tmp_path)
    assert metrics["status"] == "interrupted"
    assert metrics["message"] == "interrupted by SIGINT after 1 finished epochs"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lr=math.inf), "lr must be a finite number, got inf"),
        (dict(lr=math.nan), "lr must be a finite number, got nan"),
        (dict(dropout=math.nan), "dropout must be a finite number, got nan"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*63 - 1\], got -1"),
        (dict(seed=2**63), r"seed must be in \[0, 2\*\*63 - 1\]"),
    ],
)
def test_non_finite_and_out_of_range_settings_are_rejected(tmp_path, settings, message):
    with pytest.raises(normzoo.NormzooError, match=message):
        launch(RunConfig(runs_dir=str(tmp_path), **settings), progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["mps", "meta", "xla"])
def test_devices_other_than_cpu_and_cuda_are_refused(device):
    with pytest.raises(
        normzoo.NormzooError, match=f"'{device}' is not supported; .* auto, cpu, cuda or cuda:N"
    ):
        resolve_device(device)


def test_accuracy_of_an_empty_split_is_an_error():
    empty = Split(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(normzoo.NormzooError, match="0 examples"):
        accuracy(lenet("none"), empty)
