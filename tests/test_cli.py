"""The command line: listings, help, errors as one line, and a short real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from normzoo.cli import main


def test_list_shows_the_bundled_norms(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("batchnorm", "torch-batchnorm", "layernorm", "none"):
        assert f"\n{name} " in out


def test_info_shows_options_defaults_and_reference(capsys):
    assert main(["info", "batchnorm"]) == 0
    out = capsys.readouterr().out
    assert "momentum (float, default 0.1, >= 0.0, <= 1.0)" in out
    assert "reference:" in out and "Ioffe" in out


def test_plugins_shows_versions(capsys):
    assert main(["plugins"]) == 0
    assert "batchnorm (normzoo " in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "layernrom"], "normzoo: error: unknown norm 'layernrom'; valid norms: layernorm"),
        (["run", "--norm", "batchnorm", "--norm-opt", "eps=tiny"], "expects float, got 'tiny'"),
        (
            ["run", "--norm", "none", "--norm-opt", "eps=1"],
            "norm 'none': unknown option 'eps'; valid options: (none)",
        ),
        (["run", "--download"], "--download needs --data-dir"),
        (["run", "--data-dir", "/nonexistent/fmnist"], "train-images-idx3-ubyte[.gz] not found"),
    ],
)
def test_errors_are_one_line_with_the_bad_value(argv, message, capsys, tmp_path):
    assert main(argv + ["--runs-dir", str(tmp_path)] if argv[0] == "run" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_argument_types_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--norm-opt", "no-equals-sign"])
    assert exited.value.code == 2
    assert "expected KEY=VALUE, got 'no-equals-sign'" in capsys.readouterr().err


def test_console_script_runs_a_short_training(tmp_path):
    completed = subprocess.run(
        [
            sys.executable, "-m", "normzoo", "run", "--norm", "torch-batchnorm", "--epochs", "1",
            "--train-subset", "1000", "--test-subset", "300", "--runs-dir", str(tmp_path),
            "--device", "cpu", "--norm-opt", "momentum=0.2",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "epoch  1: train loss" in completed.stdout and "examples/s" in completed.stdout
    assert "done: norm torch-batchnorm, test acc" in completed.stdout
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resolved_norm_options"]["momentum"] == 0.2


def test_help_explains_every_command():
    for argv in (["--help"], ["run", "--help"], ["info", "--help"]):
        completed = subprocess.run(
            [sys.executable, "-m", "normzoo", *argv], capture_output=True, text=True
        )
        assert completed.returncode == 0 and "usage: normzoo" in completed.stdout
    completed = subprocess.run(
        [sys.executable, "-m", "normzoo", "run", "--help"], capture_output=True, text=True
    )
    assert "--norm-opt KEY=VALUE" in completed.stdout and "(default: 1.0)" in completed.stdout
