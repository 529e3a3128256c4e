"""`normzoo compare --executor ray`: a page's runs as tasks of a real local Ray instance, with
results bit-identical to the local executor's, a killed Ray worker retried (or reported), and
nothing finished lost or run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from normzoo import cli
from normzoo.compare import CompareConfig, compare
from normzoo.compare.execute import PendingRun
from normzoo.errors import NormzooError
from normzoo.harness.config import RunConfig

from .pages import two_arms, write_page

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
import normzoo.compare.ray_executor as ray_executor  # noqa: E402

#: Each run's numbers that must not depend on where it trained.
NUMBERS = ("train_loss", "train_acc", "test_acc", "running_test_acc")
#: The process title of a Ray worker while it runs one of the comparison's tasks.
TASK_TITLE = "ray::train_on_worker"
ON_RAY = CompareConfig(jobs=2, threads=1, progress=False, executor="ray")


def stored(page: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text())
            for path in (page.parent / "results").glob("*.json")}  # fmt: skip


def numbers(result: dict) -> list[dict]:
    return [{name: epoch.get(name) for name in NUMBERS} for epoch in result["epochs"]]


def kill_first_task_worker(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker seen running one of the comparison's tasks."""
    while not stop.is_set():
        listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True)
        for line in listing.stdout.splitlines():
            pid, _, args = line.strip().partition(" ")
            if args.startswith(TASK_TITLE):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.05)


def compare_while_killing_a_worker(page: Path, config: CompareConfig) -> tuple[int, list[int]]:
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_first_task_worker, args=(killed, stop), daemon=True)
    killer.start()
    try:
        failures = compare([page], config, say=lambda line: None)
    finally:
        stop.set()
        killer.join(5)
    return failures, killed


@pytest.fixture(autouse=True)
def no_ray_left_running():
    yield
    assert not ray.is_initialized()  # a local instance that compare started, it shut down


def test_a_page_on_ray_stores_what_the_local_executor_stores(tmp_path):
    block = two_arms(seeds=2)
    local = write_page(tmp_path / "local", block)
    on_ray = write_page(tmp_path / "ray", block)
    assert compare([local], CompareConfig(jobs=2, threads=1, progress=False)) == 0
    assert compare([on_ray], ON_RAY) == 0
    expected, found = stored(local), stored(on_ray)
    assert len(found) == 4 and found.keys() == expected.keys()
    for key, result in found.items():
        assert result["status"] == "finished" and result["threads"] == 1
        assert numbers(result) == numbers(expected[key]), result["label"]
    # the generated sections agree but for the measured speeds and times
    assert "| without bias | 2 |" in on_ray.read_text()


def test_a_killed_ray_worker_is_retried_and_a_rerun_redoes_nothing(tmp_path, capsys):
    page = write_page(tmp_path, two_arms(seeds=2))
    failures, killed = compare_while_killing_a_worker(page, ON_RAY)
    assert killed and failures == 0
    assert len(stored(page)) == 4  # the killed task ran again, on a fresh worker
    before = stored(page)
    assert cli.main(["compare", str(page), "--executor", "ray", "--no-progress"]) == 0
    assert "4 runs: 4 stored, 0 to run" in capsys.readouterr().out
    assert stored(page) == before


def test_a_worker_killed_more_often_than_retried_is_reported_and_the_rest_kept(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(ray_executor, "MAX_RETRIES", 0)
    page = write_page(tmp_path, two_arms(seeds=2))
    failures, killed = compare_while_killing_a_worker(page, ON_RAY)
    assert killed and failures == 1
    said = capsys.readouterr()
    (line,) = [line for line in (said.out + said.err).splitlines() if line.startswith("failed: ")]
    assert "its Ray worker died and 0 retries did not finish it" in line
    assert "nothing of the run was stored" in line
    assert len(stored(page)) == 3  # the others finished and stayed
    kept = stored(page)
    monkeypatch.undo()
    assert compare([page], ON_RAY, say=lambda line: None) == 0
    assert len(stored(page)) == 4
    assert all(stored(page)[key] == result for key, result in kept.items())  # not run again


def test_a_runs_own_error_comes_back_as_it_was_raised_and_nothing_is_stored(tmp_path):
    """An error the run raises on the worker is its failure, as with the local executor (Ray
    retries only a worker that died)."""
    config = RunConfig(epochs=1, train_subset=64, test_subset=32, lr=float("nan"))
    run = PendingRun("bad lr", config, "0" * 16, tmp_path / "results")
    reported = []
    ray_executor.run_on_ray([run], 1, 1, lambda *done: reported.append(done))
    ((_, result, error),) = reported
    assert result is None and isinstance(error, NormzooError)
    assert "lr must be a finite number, got nan" in str(error)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--address", "auto"], "--address auto is a Ray cluster's: add --executor ray"),
        (["--check", "--executor", "ray"], "--check trains nothing"),
        (
            ["--executor", "ray", "--address", "127.0.0.1:1"],
            "--address 127.0.0.1:1: no Ray cluster to join there",
        ),
        (
            ["--executor", "ray", "--address", "localhost"],
            "--address localhost: expected auto, HOST:PORT or ray://HOST:PORT",
        ),
    ],
)
def test_bad_executor_options_are_one_line(page, argv, says, capsys):
    assert cli.main(["compare", str(page), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_without_ray_the_executor_says_how_to_install_it(page, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert cli.main(["compare", str(page), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "--executor ray needs Ray, which is not installed" in err
    assert 'pip install -e ".[ray]"' in err


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_pages_join_a_running_ray_cluster_and_leave_it_running(tmp_path, capsys, monkeypatch):
    """`ray start --head`, then `--address auto` on its machine, or its HOST:PORT with Ray's
    token authentication named (RAY_AUTH_MODE=token): the cluster's workers train, the driver
    stores, and the cluster runs on."""
    ray_cli = Path(sys.executable).parent / "ray"  # the environment's own `ray`
    port = free_port()
    environment = {**os.environ, "RAY_worker_niceness": "0", "OMP_NUM_THREADS": "1"}
    start = [str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, env=environment, check=True, capture_output=True, timeout=120)
    try:
        for address in ("auto", f"127.0.0.1:{port}"):
            if address != "auto":
                monkeypatch.setenv("RAY_AUTH_MODE", "token")
            page = write_page(tmp_path / address.replace(":", "-"), two_arms())
            argv = ["compare", str(page), "--executor", "ray", "--address", address,
                    "--threads", "1", "--no-progress"]  # fmt: skip
            assert cli.main(argv) == 0
            out = capsys.readouterr().out
            assert f"(Ray tasks on the running cluster (--address {address}), 1 thread " in out
            assert [result["status"] for result in stored(page).values()] == ["finished"] * 2
        probe = "import ray; ray.init(address='auto'); print(int(ray.cluster_resources()['CPU']))"
        alive = subprocess.run([sys.executable, "-c", probe], env=environment,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert alive.stdout.strip().splitlines()[-1] == "2"  # compare only joined it
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, timeout=120)


def ray_task_workers() -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True)
    return [int(line.split()[0]) for line in listing.stdout.splitlines()
            if line.strip().partition(" ")[2].startswith(TASK_TITLE)]  # fmt: skip


def test_ctrl_c_keeps_what_came_back_cancels_the_rest_and_exits_130(tmp_path):
    page = write_page(tmp_path, two_arms(seeds=2).replace("epochs = 1", "epochs = 6"))
    command = [sys.executable, "-m", "normzoo", "compare", str(page), "--executor", "ray",
               "--jobs", "2", "--threads", "1", "--no-progress"]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)
    results = tmp_path / "results"
    deadline = time.monotonic() + 240
    while not (results.exists() and any(results.glob("*.json"))):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    kept = stored(page)
    assert 1 <= len(kept) < 4
    assert f"interrupted: {len(kept)} of 4 runs finished and stored" in out
    deadline = time.monotonic() + 30
    while ray_task_workers() and time.monotonic() < deadline:  # cancelled, instance shut down
        time.sleep(0.2)
    assert ray_task_workers() == []
    assert compare([page], ON_RAY, say=lambda line: None) == 0
    assert len(stored(page)) == 4
    assert all(stored(page)[key] == result for key, result in kept.items())
