"""The command line: listings, help, errors as one line, and a short real run."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading

import pytest

import normzoo
from normzoo.cli import main
from normzoo.workloads.data import bundled_dir


def test_list_shows_the_bundled_norms(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("batchnorm", "torch-batchnorm", "layernorm", "none"):
        assert f"\n{name} " in out


def test_info_shows_options_defaults_and_reference(capsys):
    assert main(["info", "batchnorm"]) == 0
    out = capsys.readouterr().out
    assert "momentum (float, default 0.1, >= 0.0, <= 1.0" in out
    assert "reference:" in out and "Ioffe" in out


def test_plugins_shows_versions(capsys):
    assert main(["plugins"]) == 0
    assert "batchnorm (normzoo " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "<!-- normzoo:results:begin -->" in out and "docs/writing-a-plugin.md" in out


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
        (["run", "--data-dir", "{tmp}/fmnist"], "--data-dir {tmp}/fmnist does not exist; "),
        (["run", "--data-dir", "{tmp}/afile"], "--data-dir {tmp}/afile is a file, not a dir"),
        (["run", "--runs-dir", "{tmp}/afile"], "--runs-dir {tmp}/afile is a file; pass another"),
        (["run", "--runs-dir", "{tmp}/afile/runs"], "is under {tmp}/afile, which is a file"),
        (["run", "--device", "mps"], "device 'mps' is not supported; normzoo runs on auto, cpu"),
        (["run", "--device", "meta"], "device 'meta' is not supported"),
        (  # 3 fits conv1's 6 channels, not conv2's 16: the error names what fits every layer
            ["run", "--norm", "groupnorm", "--norm-opt", "groups=3"],
            "must divide num_features=16, got 3; choose one of 1, 2, 4, 8, 16 (lenet normalizes "
            "layers of 6, 16, 120, 84 channels with placement 'all'; values that fit all of "
            "them: groups = 1, 2)",
        ),
        (["run", "--lr", "inf"], "lr must be a finite number, got inf"),
        (["run", "--lr", "nan"], "lr must be a finite number, got nan"),
        (["run", "--dropout", "nan"], "dropout must be a finite number, got nan"),
        (
            ["run", "--batch-size", "1", "--train-subset", "64", "--norm", "batchnorm"],
            "norm 'batchnorm' (module '10') failed on input (1, 120) in train mode",
        ),
    ],
)
def test_errors_are_one_line_with_the_bad_value(argv, message, capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if argv[0] == "run":  # a --runs-dir in argv comes later and wins
        argv = ["run", "--runs-dir", str(tmp_path / "runs"), "--no-progress", *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("{tmp}", str(tmp_path)) in err[0], err
    assert not (tmp_path / "runs").exists()  # every check comes before the run directory


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--norm-opt", "no-equals-sign"], "expected KEY=VALUE, got 'no-equals-sign'"),
        (["run", "--seed", "-1"], "argument --seed: expected an integer from 0 to 2**63 - 1"),
        (["run", "--seed", str(2**63)], f"got '{2**63}' (see `normzoo run --help`)"),
        (["run", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["run", "--bogus"], "unrecognized arguments: --bogus (see `normzoo run --help`)"),
        (["info"], "required: name (see `normzoo info --help`)"),
        (["lst"], "invalid choice: 'lst'"),
    ],
)
def test_argument_errors_are_one_line_without_the_usage_block(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normzoo: error: ") and message in err[0], err


def test_plugins_verbose_shows_the_traceback_of_a_failed_plugin(fake_site, capsys):
    normzoo.default_registry.cache_clear()  # load again, now with the fake site on sys.path
    try:
        assert main(["plugins"]) == 0
        plain = capsys.readouterr().out
        assert main(["plugins", "--verbose"]) == 0
        verbose = capsys.readouterr().out
        broken = {record.name: record for record in normzoo.plugins()}["broken"]
    finally:
        normzoo.default_registry.cache_clear()
    assert "broken (normzoo_broken 1.2.3): FAILED: " in plain and "Traceback" not in plain
    if getattr(broken, "traceback", None) is None:
        pytest.skip("this registry does not record plugin tracebacks")
    lines = verbose.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("broken ("))
    assert lines[start + 1] == "    Traceback (most recent call last):"
    assert "    RuntimeError: this plugin is broken on purpose" in lines
    assert "--verbose` shows the tracebacks" in plain and "--verbose`" not in verbose
    assert "scale (normzoo_scale 1.2.3): norms: third-party-scale" in lines


def test_tilde_in_runs_and_data_dirs_is_expanded_and_files_follow_the_umask(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    for source in bundled_dir().glob("*.gz"):
        (tmp_path / "data" / source.name).symlink_to(source)
    old = os.umask(0o027)
    try:
        status = main(
            [
                "run", "--norm", "none", "--epochs", "1", "--train-subset", "512",
                "--test-subset", "100", "--precise-stats", "0", "--no-progress",
                "--device", "cpu", "--runs-dir=~/runs", "--data-dir=~/data",
            ]
        )  # fmt: skip
    finally:
        os.umask(old)
    out, err = capsys.readouterr()
    assert status == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"results: {run_dir}" in out
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir()}
    assert modes == dict.fromkeys(["config.json", "metrics.json", "model.pt", "curves.png"], 0o640)


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


def test_sigterm_ends_a_run_as_interrupted(tmp_path):
    """A real ``kill``: the run's files say ``interrupted``, never ``running``."""
    process = subprocess.Popen(
        [
            sys.executable, "-m", "normzoo", "run", "--norm", "none", "--epochs", "50",
            "--train-subset", "8192", "--test-subset", "100", "--precise-stats", "0",
            "--no-progress", "--device", "cpu", "--runs-dir", str(tmp_path),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    try:
        first = process.stdout.readline()  # the epoch line is flushed as soon as it exists
        if not first.startswith("epoch  1: train loss"):
            process.kill()
            pytest.fail(f"no epoch line: {first!r} {process.communicate()}")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate()
    finally:
        watchdog.cancel()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    (message,) = err.strip().splitlines()
    assert message.startswith("normzoo: terminated by SIGTERM after ")
    (run_dir,) = tmp_path.iterdir()
    assert message.endswith(f"finished epochs are saved in {run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["message"].startswith("terminated by")
    assert 1 <= len(metrics["epochs"]) < 50
    assert not (run_dir / "model.pt").exists()


def test_a_norm_that_placement_none_leaves_out_is_warned_of(tmp_path, capsys):
    argv = ["run", "--placement", "none", "--norm", "layernorm", "--epochs", "1",
            "--train-subset", "256", "--test-subset", "64", "--precise-stats", "0",
            "--no-progress", "--runs-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "warning: --placement none puts no norm in lenet: --norm layernorm" in (
        capsys.readouterr().err
    )


def test_help_explains_every_command(capsys):
    completed = subprocess.run(
        [sys.executable, "-m", "normzoo", "--help"], capture_output=True, text=True
    )
    assert completed.returncode == 0 and "usage: normzoo" in completed.stdout
    for command in ("run", "info", "plugins", "bench", "compare"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: normzoo {command}")
        # a default is shown where it tells something: not a flag's False, not "not given"
        assert not any(
            noise in out
            for noise in ("(default: True)", "(default: False)", "(default: None)", "(default: [])")
        ), out
    main_help = completed.stdout
    assert all(command in main_help for command in ("run", "list", "info", "plugins"))
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--norm-opt KEY=VALUE" in out and "(default: 1.0, or the workload's own" in out
    assert "--seed SEED" in out and "2**63 - 1" in out
