"""`normzoo compare` when it is stopped: workers die with it, temporary folders go, the exit
status and the count of stored runs are right; Ctrl-C during start-up; read-only pages."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import normzoo.compare as compare_module
from normzoo.cli import main
from normzoo.compare import compare
from normzoo.compare.page import BEGIN, END, PageError
from normzoo.harness.interrupts import RunInterrupted
from tests.conftest import install_fake_distribution

from .pages import QUIET

TINY = "epochs = 1\ntrain_subset = 256\ntest_subset = 128\nprecise_stats = 2\n"


def write_page(directory: Path, settings: str = TINY, seeds: int = 1) -> Path:
    page = directory / "page.md"
    page.write_text(
        f'# A page\n\n```normzoo\nseeds = {seeds}\nbaseline = "a"\n\n[base]\n{settings}\n'
        '[[variant]]\nlabel = "a"\n\n[[variant]]\nlabel = "b"\nbias_before_norm = false\n'
        f"```\n\n{BEGIN}\n{END}\n"
    )
    return page


def children(pid: int) -> dict[int, str]:
    """The live children of ``pid`` and their command lines, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name))[1] == pid:
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
    return {child: cmdline.decode(errors="replace") for child, cmdline in found.items()}


def _stat(pid: int) -> tuple[str, int]:
    """(state, parent pid) of ``pid``; state "" when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", 0
    state, parent = text.rsplit(")", 1)[1].split()[:2]
    return state, int(parent)


def alive(pid: int) -> bool:
    return _stat(pid)[0] not in ("", "Z", "X")  # a zombie has exited


def leftovers(tmp: Path) -> list[str]:
    return sorted(path.name for path in tmp.glob("normzoo-*"))


def test_sigkilled_compare_takes_its_workers_and_their_folders_with_it(tmp_path):
    """SIGKILL cannot be handled: the workers notice that their parent is gone and exit, and
    the resource tracker follows, so a reader of the output sees its end."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    settings = "epochs = 3\ntrain_subset = 2048\ntest_subset = 256\nprecise_stats = 2\n"
    page = write_page(tmp_path, settings)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    command = [sys.executable, "-m", "normzoo", "compare", str(page), "--jobs", "2",
               "--threads", "1", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    spawned: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while True:  # both workers exist and at least one of them trains
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            spawned.update(children(process.pid))
            workers = [pid for pid, cmdline in spawned.items() if "spawn_main" in cmdline]
            if len(workers) == 2 and any(tmp.rglob("config.json")):
                break
            time.sleep(0.1)
        assert any("resource_tracker" in cmdline for cmdline in spawned.values()), spawned
        process.kill()
        process.wait(10)
        ended = threading.Event()

        def read_to_the_end() -> None:
            process.stdout.read()
            process.stderr.read()
            ended.set()

        threading.Thread(target=read_to_the_end, daemon=True).start()
        assert ended.wait(15), "the output pipes are still held open"
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in spawned if alive(pid)], spawned
        assert leftovers(tmp) == []
    finally:
        for pid in spawned:  # only what this test started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_compare_with_143_the_stored_count_and_no_temporary_folder(tmp_path):
    """`--jobs 2 --no-progress`, SIGTERM once the first result is stored."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    page = write_page(tmp_path, TINY.replace("epochs = 1", "epochs = 4"), seeds=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    command = [sys.executable, "-m", "normzoo", "compare", str(page), "--jobs", "2",
               "--threads", "1", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    results = tmp_path / "results"
    deadline = time.monotonic() + 120
    while not (results.exists() and any(results.glob("*.json"))):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    stored = len(list(results.glob("*.json")))
    assert 1 <= stored < 4
    assert f"interrupted: {stored} of 4 runs finished and stored" in out
    assert leftovers(tmp) == []


def test_the_interrupted_count_is_the_stored_runs_without_a_progress_bar(
    tmp_path, monkeypatch, capsys
):
    page = write_page(tmp_path)
    real = compare_module.run_all

    def stop_after_the_first(runs, jobs, threads, on_done):
        def done(*args):
            on_done(*args)
            raise KeyboardInterrupt

        return real(runs, jobs, threads, done)

    monkeypatch.setattr(compare_module, "run_all", stop_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        compare([page], QUIET)
    assert len(list((tmp_path / "results").glob("*.json"))) == 1
    assert "interrupted: 1 of 2 runs finished and stored" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "status"),
    [(RunInterrupted("stopped by SIGTERM", signal.SIGTERM), 143), (KeyboardInterrupt(), 130)],
)
def test_an_interrupted_compare_exits_with_128_plus_the_signal(
    tmp_path, monkeypatch, error, status
):
    def interrupted(*args, **kwargs):
        raise error

    monkeypatch.setattr(compare_module, "compare", interrupted)
    assert main(["compare", str(write_page(tmp_path)), "--no-progress"]) == status


def test_no_smoke_folder_without_smoke_and_no_folder_left_after_ctrl_c(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    page = write_page(tmp_path)
    real = compare_module.run_all
    seen: list[list[str]] = []

    def interrupt_the_first(runs, jobs, threads, on_done):
        def done(*args):
            seen.append(leftovers(tmp))
            raise KeyboardInterrupt

        return real(runs, jobs, threads, done)

    monkeypatch.setattr(compare_module, "run_all", interrupt_the_first)
    with pytest.raises(KeyboardInterrupt):
        compare([page], QUIET)
    assert seen and not any(name.startswith("normzoo-smoke-") for name in seen[0])
    assert leftovers(tmp) == []


def test_a_rewritten_page_keeps_its_permission_bits(tmp_path):
    page = write_page(tmp_path)
    page.chmod(0o640)
    old = os.umask(0o022)
    try:
        assert compare([page], QUIET) == 0
    finally:
        os.umask(old)
    assert "| a | 1 |" in page.read_text()
    assert stat.S_IMODE(page.stat().st_mode) == 0o640


def test_a_read_only_page_is_refused_before_anything_trains(tmp_path, monkeypatch):
    page = write_page(tmp_path)
    before = page.read_text()
    real = os.access

    def access(path, mode, *args, **kwargs):  # root writes anything: pretend the page is not
        if Path(path) == page and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(PageError, match=f"{page}: the page is not writable"):
        compare([page], QUIET)
    assert not (tmp_path / "results").exists() and page.read_text() == before


SLOW_PLUGIN = """
    import os
    import time
    from pathlib import Path

    Path(os.environ["NORMZOO_TEST_MARKER"]).write_text("loading")
    time.sleep(60)
"""


def console_scripts() -> dict[str, list[str]]:
    """``python -m normzoo``, and the ``normzoo`` script that pip made beside this Python."""
    scripts = {"python -m": [sys.executable, "-m", "normzoo"]}
    script = Path(sys.executable).parent / "normzoo"
    return scripts | ({"script": [str(script)]} if script.exists() else {})


def interrupted_at_the_marker(
    command: list[str], site: Path, marker: Path
) -> tuple[int | None, str, str]:
    """Run ``command`` with ``site`` first on PYTHONPATH, send SIGINT once the code it imports
    writes ``marker``; its exit status, stdout and stderr."""
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, NORMZOO_TEST_MARKER=str(marker))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    return process.returncode, out, err


@pytest.mark.parametrize("entry", console_scripts().values(), ids=console_scripts().keys())
def test_ctrl_c_while_starting_up_is_one_line_and_130(tmp_path, entry):
    """Ctrl-C while a plugin is still being imported (the start-up of every command)."""
    site = install_fake_distribution(
        tmp_path / "site", "normzoo_slow", "normzoo_slow", SLOW_PLUGIN, "slow"
    )
    returncode, out, err = interrupted_at_the_marker([*entry, "list"], site, tmp_path / "marker")
    assert returncode == 130, err
    assert err.strip().splitlines() == ["normzoo: interrupted"]


# Slows the first import of torch (which ``import normzoo`` makes before any normzoo code runs)
# by 3 s and, like native start-up code can, swallows a KeyboardInterrupt raised meanwhile:
# Python runs a sitecustomize module found on PYTHONPATH at start-up.
SLOW_TORCH = """
import os
import sys
import time
from pathlib import Path


class SlowTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            Path(os.environ["NORMZOO_TEST_MARKER"]).write_text("importing torch")
            try:
                time.sleep(3)
            except KeyboardInterrupt:  # as native start-up code may swallow it
                pass
        return None


sys.meta_path.insert(0, SlowTorch())
"""


def test_ctrl_c_while_the_script_imports_torch_is_one_line_and_130(tmp_path):
    """The ``normzoo`` script: an interrupt while ``import normzoo`` imports torch is held back
    until the import is done (raised inside torch's C++ start-up it can abort the process, or
    be swallowed), then answered with one line; the command does not run."""
    script = Path(sys.executable).parent / "normzoo"
    if not script.exists():
        pytest.skip("the normzoo script is not installed beside this Python")
    (tmp_path / "sitecustomize.py").write_text(SLOW_TORCH)
    returncode, out, err = interrupted_at_the_marker([str(script), "list"], tmp_path,
                                                     tmp_path / "marker")  # fmt: skip
    assert returncode == 130, err
    assert err.strip().splitlines() == ["normzoo: interrupted"]
    assert out == ""  # the list was not printed
