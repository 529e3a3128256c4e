"""The ``ray`` executor: a comparison's runs as Ray tasks, on this machine or on a cluster.

Each run is one task that asks Ray for ``num_cpus`` equal to its torch thread budget (and one
GPU for a run on ``cuda``), trains on whichever node Ray places it, and returns its result to
the driver; the driver alone stores results and rewrites pages, so the nodes need no shared
filesystem. They do need normzoo and every plugin the pages name installed in the Python
environment Ray starts on them (the bundled data is part of the package): this module ships no
code through Ray's runtime environment, so what trains is what is installed, as
``code_revision`` records in each result.

Without an address the driver starts a local Ray instance of ``jobs x threads`` CPUs (the
same concurrency as ``--jobs``) and shuts it down at the end; with ``address`` (``auto``,
``HOST:PORT`` or ``ray://HOST:PORT``) it joins a running cluster, whose CPUs then decide how
many runs train at once, and leaves it running. A driver that finds Ray already initialized
(a test, a notebook) uses that instance as it is.

A task whose worker process dies (killed, out of memory, a norm calling :func:`os._exit`) is
retried up to :data:`MAX_RETRIES` times by Ray, then reported as failed with Ray's error; an
error the run raises is reported at once, as the local executor does. Ctrl-C or SIGTERM store
every result already back, cancel the tasks still running, and raise
:class:`KeyboardInterrupt`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

from normzoo.compare.cache import ResultStore
from normzoo.compare.execute import PendingRun, RunFailed, result_of
from normzoo.errors import NormzooError, describe
from normzoo.harness.group import use_threads
from normzoo.harness.interrupts import stops_interrupt

#: Seconds to wait for a cluster's address to answer before saying there is none.
CONNECT_TIMEOUT = 5.0

#: How many times Ray runs a task again after its worker process died.
MAX_RETRIES = 2

#: The variable from which a Ray instance takes its workers' niceness (its default: 15).
WORKER_NICENESS = "RAY_worker_niceness"

#: How ``normzoo`` asks for Ray where it is missing.
INSTALL_HINT = 'pip install -e ".[ray]" (or pip install ray)'


def import_ray() -> Any:
    """Ray, or a :class:`~normzoo.errors.NormzooError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise NormzooError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}"
                           ) from None  # fmt: skip
    return ray


def train_on_worker(run: PendingRun, threads: int) -> dict[str, Any]:
    """A Ray task's body: the run's result, trained with ``threads`` torch threads in a
    temporary folder of the worker's machine (nothing stored there)."""
    use_threads(threads)
    with tempfile.TemporaryDirectory(prefix="normzoo-ray-") as scratch:
        return result_of(run, threads, scratch)


def _start(ray: Any, address: str | None, cpus: int) -> bool:
    """Connect to Ray; whether this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        # Ray starts its workers at niceness 15 unless told otherwise; on a machine busy with
        # anything else they then crawl (importing torch took 45 s instead of 3), where the
        # local executor's processes run at the user's priority
        given = os.environ.get(WORKER_NICENESS)
        os.environ[WORKER_NICENESS] = given or "0"
        try:
            ray.init(num_cpus=cpus, **quiet)
        finally:
            if given is None:
                del os.environ[WORKER_NICENESS]
    else:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            token = "" if address == "auto" or os.environ.get("RAY_AUTH_MODE") else (
                "; if a cluster with token authentication (Ray's default) runs there, set "
                "RAY_AUTH_MODE=token and give its token (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            )  # fmt: skip
            raise NormzooError(
                f"--address {address}: could not join a Ray cluster there ({describe(error)}); "
                f"start one with `ray start --head`, or leave out --address for a local "
                f"instance{token}"
            ) from None
    return True


def check_reachable(address: str) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address where nothing listens is a
    :class:`~normzoo.errors.NormzooError` within :data:`CONNECT_TIMEOUT` seconds: Ray itself
    keeps retrying such an address for minutes. ``auto`` is Ray's to resolve (it fails at once
    when no cluster runs here)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto":
        return
    if not host or not sep or not port.isdigit():
        raise NormzooError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        raise NormzooError(
            f"--address {address}: no Ray cluster to join there ({describe(error)}); start one "
            "with `ray start --head`, or leave out --address for a local instance"
        ) from None


def _failure(ray: Any, error: BaseException) -> BaseException:
    """What ``on_done`` reports for a task that raised ``error`` in :func:`ray.get`: the run's
    own exception where Ray kept it, else one line saying how the worker ended."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        return cause if isinstance(cause, BaseException) else RunFailed(describe(error))
    lines = str(error).strip().splitlines()
    how = lines[0] if lines else type(error).__name__
    return RunFailed(f"its Ray worker died and {MAX_RETRIES} retries did not finish it "
                     f"({type(error).__name__}: {how}); nothing of the run was stored")  # fmt: skip


def run_on_ray(
    runs: Sequence[PendingRun],
    jobs: int,
    threads: int,
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
    address: str | None = None,
) -> None:
    """Run ``runs`` as Ray tasks of ``threads`` CPUs each, storing each result as it comes back
    and calling ``on_done(run, result, error)``; see the module's docstring."""
    if not runs:
        return
    ray = import_ray()
    # ray.init installs its own SIGTERM handler and leaves it behind after shutdown
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    started = _start(ray, address, jobs * threads)
    task = ray.remote(train_on_worker)
    pending: dict[Any, PendingRun] = {}
    try:
        with stops_interrupt():
            for run in runs:
                gpus = 1 if run.config.device.startswith("cuda") else 0
                options = task.options(num_cpus=threads, num_gpus=gpus, max_retries=MAX_RETRIES)
                pending[options.remote(run, threads)] = run
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    _collect(ray, done, pending, on_done)
            except KeyboardInterrupt:
                finished, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                _collect(ray, finished, pending, on_done)  # nothing finished is lost
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
    finally:
        if started:
            ray.shutdown()
        if threading.current_thread() is threading.main_thread():
            for number, handler in handlers.items():
                signal.signal(number, handler)


def _collect(
    ray: Any,
    done: list[Any],
    pending: dict[Any, PendingRun],
    on_done: Callable[[PendingRun, dict[str, Any] | None, BaseException | None], None],
) -> None:
    """Store and report the finished tasks ``done``, taking them out of ``pending``."""
    for ref in done:
        run = pending.pop(ref)
        try:
            result = ray.get(ref)
        except Exception as error:  # the run's failure, or its worker's
            on_done(run, None, _failure(ray, error))
            continue
        ResultStore(run.results_dir).save(run.key, result)
        on_done(run, result, None)
