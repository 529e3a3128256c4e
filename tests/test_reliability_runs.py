"""Runs that used to end quietly wrong: norms that the trial batch now catches (eval mode that
depends on the batch, statistics kept outside the state_dict), a model at chance level, more
processes than the memory holds, a KeyboardInterrupt that no signal sent, and a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normzoo
from normzoo.cli import main
from normzoo.harness import group, runs, train
from normzoo.harness.config import RunConfig
from normzoo.harness.interrupts import RunInterrupted
from normzoo.harness.launch import launch
from normzoo.harness.train import NormProbeError, probe_norms
from normzoo.workloads.data import Split

from .conftest import lenet

TINY = dict(
    placement="fc", epochs=1, train_subset=1024, test_subset=256, precise_stats=2,
    batch_size=256,
)  # fmt: skip
CLI_TINY = [
    "--epochs", "1", "--train-subset", "1024", "--test-subset", "256", "--precise-stats", "2",
    "--no-progress", "--device", "cpu",
]  # fmt: skip


def declare(name: str, factory, uses_batch_stats: bool = True) -> normzoo.NormInfo:
    return normzoo.NormInfo(
        name=name, summary=f"test norm {name}", layouts=("fc", "conv"),
        uses_batch_stats=uses_batch_stats, factory=factory,
    )  # fmt: skip


def run(tmp_path, norm: str, factory, **settings):
    config = RunConfig(norm=norm, runs_dir=str(tmp_path / "runs"), **{**TINY, **settings})
    with normzoo.register(declare(norm, factory)):
        return launch(config, progress=False)


def channel_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


class IgnoresTraining(nn.Module):
    """Normalizes with the batch's statistics in eval mode too (never looks at ``training``),
    although it keeps running averages as buffers."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=channel_dims(x), keepdim=True)
        with torch.no_grad():
            self.running_mean.lerp_(mean.flatten(), 0.1)
        return x - mean


class MeanInAList(nn.Module):
    """Keeps its running means in a plain Python list: not in state_dict, not in model.pt."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.means: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=channel_dims(x), keepdim=True)
            self.means.append(mean.detach())
            return x - mean
        if not self.means:
            return x
        return x - torch.stack(self.means).mean(dim=0)


class MeanInAPlainTensor(nn.Module):
    """Keeps its running mean in a tensor attribute that was never registered as a buffer."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.running_mean = torch.zeros(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=channel_dims(x))
            self.running_mean.lerp_(mean.detach(), 0.1)
            return x - mean.view(shape)
        return x - self.running_mean.view(shape)


class MeanInAFloat(nn.Module):
    """Keeps one running mean as a plain Python float: no tensor attribute to spot, but its
    eval-mode output changes in training while no buffer does."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.shift = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.shift = 0.9 * self.shift + 0.1 * float(x.detach().mean())
            return x - x.mean()
        return x - self.shift


# ---------------------------------------------------------------- 5: the trial batch


def test_a_norm_that_uses_batch_statistics_in_eval_mode_is_refused(tmp_path):
    with pytest.raises(NormProbeError) as caught:
        run(tmp_path, "ignores-training", IgnoresTraining)
    message = str(caught.value)
    assert "norm 'ignores-training' (module '8')" in message, message
    assert "in eval mode" in message and "other examples of the batch" in message
    assert "\n" not in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "factory",
    [MeanInAList, MeanInAPlainTensor, MeanInAFloat],
    ids=["python-list", "plain-tensor", "python-float"],
)
def test_a_norm_with_statistics_outside_its_state_dict_is_refused(tmp_path, factory):
    with pytest.raises(NormProbeError) as caught:
        run(tmp_path, "stats-outside", factory)
    message = str(caught.value)
    assert "norm 'stats-outside' (module '8')" in message, message
    assert "keeps running statistics outside its state_dict" in message
    assert "register them as buffers" in message and "\n" not in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("placement", ["all", "fc"])
@pytest.mark.parametrize(
    "norm",
    [
        "batchnorm", "torch-batchnorm", "zca", "iternorm", "pit", "layernorm", "groupnorm",
        "instancenorm", "rmsnorm", "none", "mean-only-bn",
    ],
)  # fmt: skip
def test_every_bundled_norm_passes_the_trial_batch(norm, placement):
    if norm == "instancenorm":  # no fc layout
        if placement == "fc":
            pytest.skip("instance norm has no fc layout")
        placement = "conv"
    torch.manual_seed(0)
    model = lenet(norm, placement=placement)
    split = Split(torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)))
    probe_norms(model, split, 64, norm)


# ---------------------------------------------------------------- 6b: chance level


def test_a_run_at_chance_level_is_warned_of_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "accuracy", lambda model, split, batch_size=2048: 0.1)
    argv = ["run", "--norm", "none", "--runs-dir", str(tmp_path), *CLI_TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    done = next(index for index, line in enumerate(lines) if line.startswith("done:"))
    warning = [line for line in lines[done:] if line.startswith("warning:")]
    assert len(warning) == 1, out
    assert "chance level" in warning[0] and "--lr" in warning[0], warning[0]
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert "chance level" in metrics["warning"]


def test_a_normal_run_has_no_chance_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "accuracy", lambda model, split, batch_size=2048: 0.7)
    argv = ["run", "--norm", "none", "--runs-dir", str(tmp_path), *CLI_TINY]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().out
    (run_dir,) = tmp_path.iterdir()
    assert "warning" not in json.loads((run_dir / "metrics.json").read_text())


# ---------------------------------------------------------------- 10: --nproc and memory


def test_available_memory_is_read_from_the_machine():
    available = group.available_memory()
    assert available is not None and available > 0


def test_more_processes_than_the_memory_holds_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(group, "available_memory", lambda: 3 * group.PROCESS_MEMORY)
    # registered in this process: without the memory check, the launcher refuses it for that
    config = RunConfig(norm="ignores-training", nproc=4, runs_dir=str(tmp_path / "runs"), **TINY)
    with normzoo.register(declare("ignores-training", IgnoresTraining)):
        with pytest.raises(normzoo.NormzooError) as caught:
            launch(config, progress=False)
    message = str(caught.value)
    assert message.startswith("--nproc 4:") and "memory" in message, message
    assert "--nproc 3" in message and "\n" not in message
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 14c: KeyboardInterrupt


class RaisesKeyboardInterrupt(nn.Module):
    """A plugin that raises KeyboardInterrupt itself, in its third training call."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
        return x


def test_a_keyboard_interrupt_raised_by_a_plugin_is_not_recorded_as_sigint(tmp_path):
    with pytest.raises(KeyboardInterrupt) as caught:
        run(tmp_path, "raises-ctrl-c", RaisesKeyboardInterrupt, precise_stats=0)
    assert getattr(caught.value, "signal_number", None) is None
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "SIGINT" not in metrics["message"], metrics
    assert "KeyboardInterrupt raised in forward" in metrics["message"], metrics
    assert "test_reliability_runs.py" in metrics["message"]


def test_a_real_sigint_is_still_recorded_as_sigint(tmp_path):
    def ctrl_c(metrics):
        signal.raise_signal(signal.SIGINT)

    config = RunConfig(norm="none", runs_dir=str(tmp_path / "runs"), **TINY)
    with pytest.raises(RunInterrupted) as caught:
        launch(config, progress=False, on_epoch=ctrl_c)
    assert caught.value.signal_number == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert metrics["message"] == "interrupted by SIGINT after 1 finished epochs"


def test_the_cli_does_not_report_a_raised_keyboard_interrupt_as_a_signal(tmp_path, capsys):
    with normzoo.register(declare("raises-ctrl-c", RaisesKeyboardInterrupt, False)):
        status = main(
            ["run", "--norm", "raises-ctrl-c", "--placement", "fc", "--runs-dir",
             str(tmp_path), *CLI_TINY]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert status != 128 + signal.SIGINT and status != 0
    assert "KeyboardInterrupt raised in forward" in err and "SIGINT" not in err


# ---------------------------------------------------------------- 15d: a full disk


def disk_full_for(monkeypatch, *names: str) -> None:
    """Writing any of the run files ``names`` fails as on a full disk (ENOSPC)."""
    real = runs.tempfile.mkstemp

    def mkstemp(*args, prefix: str = "", **kwargs):  # noqa: ANN002, ANN003
        if any(prefix.startswith(f".{name}.") for name in names):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(runs.tempfile, "mkstemp", mkstemp)


def test_a_full_disk_when_saving_the_weights_exits_1_and_records_failed(
    tmp_path, monkeypatch, capsys
):
    disk_full_for(monkeypatch, "model.pt")
    assert main(["run", "--norm", "none", "--runs-dir", str(tmp_path), *CLI_TINY]) == 1
    err = capsys.readouterr().err
    assert "model.pt" in err and "No space left on device" in err
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "model.pt" in metrics["message"]


def test_a_full_disk_when_writing_the_config_still_records_failed(tmp_path, monkeypatch, capsys):
    disk_full_for(monkeypatch, "config.json")
    assert main(["run", "--norm", "none", "--runs-dir", str(tmp_path), *CLI_TINY]) == 1
    assert "config.json" in capsys.readouterr().err
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "config.json" in metrics["message"]


def test_a_disk_full_from_the_start_names_every_file_it_could_not_write(
    tmp_path, monkeypatch, capsys
):
    disk_full_for(monkeypatch, "config.json", "metrics.json", "model.pt", "curves.png")
    assert main(["run", "--norm", "none", "--runs-dir", str(tmp_path), *CLI_TINY]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "config.json" in line and "metrics.json" in line, line
    (run_dir,) = tmp_path.iterdir()
    assert str(run_dir) in line
    assert not (run_dir / "metrics.json").exists()


def test_a_files_error_before_the_run_directory_exists_still_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--norm", "none", "--runs-dir", str(blocker), *CLI_TINY]) == 2


class Blocks(nn.Module):
    """A norm whose forward never returns in time."""

    def __init__(self, num_features, layout):
        super().__init__()
        self.num_features, self.layout = num_features, layout

    def forward(self, x):
        import time

        time.sleep(30)
        return x


def test_a_norm_that_blocks_the_trial_batch_is_named_before_any_directory(tmp_path, monkeypatch):
    """Issue 18, item 11: the trial batch has a watchdog."""
    monkeypatch.setattr(train, "PROBE_TIMEOUT", 0.5)
    with pytest.raises(NormProbeError, match="trial batch of norm 'blocks' did not finish"):
        run(tmp_path, "blocks", Blocks)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 11b: the watchdog's limit


def test_a_probe_limit_that_is_not_a_number_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NORMZOO_PROBE_TIMEOUT", "abc")
    assert main(["run", "--epochs", "1", "--runs-dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "NORMZOO_PROBE_TIMEOUT='abc' must be a number of seconds above 0" in line
    assert list(tmp_path.iterdir()) == []


def test_a_trial_batch_that_overruns_inside_torch_exits_2_not_abort(tmp_path):
    """The abandoned trial-batch thread is still inside torch when the command returns; the
    script ends the process past it instead of letting the interpreter's exit abort (134)."""
    script = Path(sys.executable).parent / "normzoo"
    if not script.exists():
        pytest.skip("the normzoo script is not installed beside this Python")
    env = dict(os.environ, NORMZOO_PROBE_TIMEOUT="0.001", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [str(script), "run", "--epochs", "1", "--train-subset", "2048", "--runs-dir",
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "did not finish within 0.001 s" in done.stderr and "terminate" not in done.stderr


def test_an_option_given_twice_is_refused(tmp_path, capsys):
    argv = ["run", "--norm-opt", "momentum=none", "--norm-opt", "momentum=0.5"]
    assert main([*argv, "--runs-dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--norm-opt momentum is given 2 times; give each option once" in line


class ExitsInForward(nn.Module):
    """Calls ``sys.exit(3)`` in its forward: a plugin that ends the process its own way."""

    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sys.exit(3)


def test_a_norm_that_calls_sys_exit_is_a_failure_naming_it(tmp_path):
    with pytest.raises(NormProbeError) as caught:
        run(tmp_path, "exits", ExitsInForward)
    message = str(caught.value)
    assert "norm 'exits'" in message and "SystemExit" in message and "\n" not in message
