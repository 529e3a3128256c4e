"""`normzoo compare` when a run or a worker goes wrong: a plugin that raises KeyboardInterrupt
fails its run only, a worker that dies never hangs the comparison, SIGKILL leaves no temporary
folder, an interrupt always says so, and two pages that would share a plot are refused before
anything trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import normzoo.compare as compare_module
from normzoo.cli import main
from normzoo.compare import compare
from normzoo.compare.page import BEGIN, END, PageError
from normzoo.harness.interrupts import RunInterrupted
from tests.conftest import install_fake_distribution
from tests.test_reliability_compare import TINY, alive, children, leftovers, write_page

from .pages import QUIET

# A norm whose forward does ``BODY``: put on a path, every process (the workers too) loads it.
PLUGIN = """
    import os

    from torch import nn

    import normzoo

    class Bad(nn.Module):
        def __init__(self, num_features, layout):
            super().__init__()
            self.num_features = num_features

        def forward(self, x):
            BODY

    @normzoo.hookimpl
    def normzoo_register_norms(register):
        register(normzoo.NormInfo(
            name="bad", summary="goes wrong in forward", layouts=("fc", "conv"),
            uses_batch_stats=False, factory=Bad, options=(), reference="tests",
        ))
"""


def bad_norm_site(root: Path, body: str) -> Path:
    return install_fake_distribution(
        root, "normzoo_bad", "normzoo_bad", PLUGIN.replace("BODY", body), "bad"
    )


def bad_page(directory: Path) -> Path:
    """Variant ``a`` (batch norm) and variant ``k`` (the bad norm), one seed each."""
    directory.mkdir(parents=True, exist_ok=True)
    page = directory / "page.md"
    page.write_text(
        f'# A page\n\n```normzoo\nseeds = 1\nbaseline = "a"\n\n[base]\n{TINY}\n'
        '[[variant]]\nlabel = "a"\n\n[[variant]]\nlabel = "k"\nnorm = "bad"\n'
        f"```\n\n{BEGIN}\n{END}\n"
    )
    return page


def run_compare(tmp_path: Path, site: Path, *args: str) -> tuple[subprocess.CompletedProcess,
                                                                 dict[int, str]]:  # fmt: skip
    """``normzoo compare`` in a subprocess, with a hard timeout: a hang fails the test. Returns
    the finished process and every process it started (by pid)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    command = [sys.executable, "-m", "normzoo", "compare", *args, "--threads", "1",
               "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    spawned: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None:
            assert time.monotonic() < deadline, "normzoo compare hangs"
            spawned.update(children(process.pid))
            time.sleep(0.1)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # only what this test started
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err), spawned


def stored(page: Path) -> int:
    return len(list((page.parent / "results").glob("*.json")))


# 1, 2: a KeyboardInterrupt that a plugin raises is its run's failure


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_plugin_raising_keyboard_interrupt_fails_its_run_and_the_others_go_on(tmp_path, jobs):
    site = bad_norm_site(tmp_path / "site", "raise KeyboardInterrupt")
    page = bad_page(tmp_path / "page")
    done, spawned = run_compare(tmp_path, site, str(page), "--jobs", jobs)
    assert done.returncode == 1, (done.stdout, done.stderr)
    failed = [line for line in done.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1, done.stdout
    assert failed[0].startswith(
        "failed: k seed 0: interrupted by a KeyboardInterrupt raised in forward (normzoo_bad.py:"
    ), failed
    assert "not by Ctrl-C or a signal" in failed[0]
    assert "interrupted:" not in done.stdout and "Traceback" not in done.stderr
    assert stored(page) == 1  # variant a's run
    assert "1 runs still missing; page not rewritten" in done.stdout
    assert not [pid for pid in spawned if alive(pid)]
    assert leftovers(tmp_path / "tmp") == []


# 1: a worker that dies never hangs the comparison


def test_a_worker_that_dies_fails_its_run_and_never_hangs_compare(tmp_path):
    """A norm calling ``os._exit(1)`` in forward kills its worker: the pool is broken. The run
    fails naming the worker's death, the other run is run again in a fresh pool, the exit
    status is 1 and no worker is left."""
    site = bad_norm_site(tmp_path / "site", "os._exit(1)")
    page = bad_page(tmp_path / "page")
    started = time.monotonic()
    done, spawned = run_compare(tmp_path, site, str(page), "--jobs", "2")
    assert done.returncode == 1, (done.stdout, done.stderr)
    failed = [line for line in done.stdout.splitlines() if line.startswith("failed:")]
    assert failed == ["failed: k seed 0: its worker process died (exit status 1); nothing of "
                      "the run was stored"], done.stdout  # fmt: skip
    assert stored(page) == 1
    assert not [pid for pid in spawned if alive(pid)]
    assert leftovers(tmp_path / "tmp") == []
    assert time.monotonic() - started < 110


def test_when_every_worker_dies_every_run_fails_and_compare_ends(tmp_path):
    """Both workers die (``os._exit`` in every norm): every run fails, and compare ends."""
    site = bad_norm_site(tmp_path / "site", "os._exit(3)")
    page = bad_page(tmp_path / "page")
    text = page.read_text().replace('label = "a"\n', 'label = "a"\nnorm = "bad"\nlr = 0.05\n')
    page.write_text(text)
    done, spawned = run_compare(tmp_path, site, str(page), "--jobs", "2")
    assert done.returncode == 1, (done.stdout, done.stderr)
    failed = sorted(line for line in done.stdout.splitlines() if line.startswith("failed:"))
    assert [line.split(":")[1] for line in failed] == [" a seed 0", " k seed 0"], done.stdout
    assert all("worker process died (exit status 3)" in line for line in failed), failed
    assert stored(page) == 0
    assert not [pid for pid in spawned if alive(pid)]


# 3: SIGKILL to compare and its workers leaves no temporary folder


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigkill_to_the_whole_group_leaves_no_temporary_folder(tmp_path, jobs):
    """``timeout -s KILL`` kills compare's whole process group, the workers with it: nothing
    of normzoo can clean up then but the remover that waits outside the group."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    settings = "epochs = 3\ntrain_subset = 2048\ntest_subset = 256\nprecise_stats = 2\n"
    page = write_page(tmp_path, settings)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    command = [sys.executable, "-m", "normzoo", "compare", str(page), "--jobs", jobs,
               "--threads", "1", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    spawned: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not any(tmp.rglob("config.json")):  # training
            assert process.poll() is None and time.monotonic() < deadline
            spawned.update(children(process.pid))
            time.sleep(0.1)
        spawned.update(children(process.pid))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        deadline = time.monotonic() + 10
        while (leftovers(tmp) or any(alive(pid) for pid in spawned)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert leftovers(tmp) == []
        assert not [pid for pid in spawned if alive(pid)], spawned
    finally:
        for pid in spawned:  # only what this test started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# 4: an interrupt that compare did not report is one line


@pytest.mark.parametrize(
    ("error", "status"),
    [(RunInterrupted("stopped by SIGINT", signal.SIGINT), 130),
     (RunInterrupted("stopped by SIGTERM", signal.SIGTERM), 143)],
)  # fmt: skip
def test_an_interrupt_before_the_runs_start_is_one_line(tmp_path, monkeypatch, capsys, error,
                                                        status):  # fmt: skip
    def interrupted(*args, **kwargs):
        raise error

    monkeypatch.setattr(compare_module, "_check_writable", interrupted)
    assert main(["compare", str(write_page(tmp_path)), "--no-progress"]) == status
    assert capsys.readouterr().err == "normzoo: interrupted\n"


def test_a_keyboard_interrupt_raised_by_code_before_the_runs_start_says_where(
    tmp_path, monkeypatch, capsys
):
    """``signal_number`` None: code raised it (a plugin), which the line says, and the exit
    status is 1, as for ``normzoo run``."""
    message = "interrupted by a KeyboardInterrupt raised in forward (bad.py:3), not by Ctrl-C"

    def interrupted(*args, **kwargs):
        raise RunInterrupted(message, None)

    monkeypatch.setattr(compare_module, "_check_writable", interrupted)
    assert main(["compare", str(write_page(tmp_path)), "--no-progress"]) == 1
    assert capsys.readouterr().err == f"normzoo: {message}\n"


def test_an_interrupt_that_compare_reported_is_not_reported_again(tmp_path, monkeypatch, capsys):
    def interrupted(runs, jobs, threads, on_done):
        raise RunInterrupted("stopped by SIGINT", signal.SIGINT)

    monkeypatch.setattr(compare_module, "run_all", interrupted)
    assert main(["compare", str(write_page(tmp_path)), "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert "interrupted: 0 of 2 runs finished and stored" in captured.out
    assert captured.err == ""


# 5: two pages that would write the same plot, given together


def test_pages_that_would_share_a_plot_are_refused_before_anything_trains(tmp_path, monkeypatch):
    one, two = bad_page(tmp_path / "a"), bad_page(tmp_path / "b")
    for page in (one, two):
        text = page.read_text().replace(
            'baseline = "a"\n', 'baseline = "a"\nfigures = "../figures"\n'
        )
        page.write_text(text.replace('norm = "bad"', 'norm = "layernorm"'))

    def trains(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(compare_module, "run_all", trains)
    with pytest.raises(PageError, match="also the plot of") as raised:
        compare([one, two], QUIET)
    assert "\n" not in str(raised.value)
    assert str(one) in str(raised.value) and str(two) in str(raised.value)
    assert not (tmp_path / "a" / "results").exists() and not (tmp_path / "figures").exists()


# what a worker raises reaches the parent: nothing that cannot be pickled breaks the pool


class Unpicklable(Exception):
    def __init__(self, first: str, second: str) -> None:  # pickle calls it with one argument
        super().__init__(f"{first} {second}")


def test_an_error_that_cannot_be_pickled_is_sent_as_one_line(tmp_path, monkeypatch):
    import pickle

    from normzoo.compare import execute as execute_module

    def raises(run, threads, scratch):
        raise Unpicklable("norm", "broke")

    monkeypatch.setattr(execute_module, "execute", raises)
    with pytest.raises(execute_module.RunFailed) as raised:
        execute_module._execute_in_worker(0, None, 1, str(tmp_path))
    assert str(pickle.loads(pickle.dumps(raised.value))) == "Unpicklable: norm broke"
    assert list(tmp_path.iterdir()) == []  # its note of the run it ran is gone


def test_run_interrupted_crosses_processes_whole():
    import pickle

    error = RunInterrupted("stopped by SIGTERM", signal.SIGTERM, Path("/runs/1"))
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.signal_number, copy.directory) == (str(error), 15, Path("/runs/1"))
