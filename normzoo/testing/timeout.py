"""Running a call with a time limit, on any thread and without signals: a norm whose forward
blocks fails its check instead of hanging the suite (or the harness, which limits its own calls
the same way).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

#: The name prefix of the threads :func:`run_with_timeout` runs a call in, and abandons when it
#: overruns (the ``normzoo`` script ends the process past them: see ``normzoo_command``).
ABANDONED_THREAD_PREFIX = "normzoo: "

T = TypeVar("T")


def run_with_timeout(
    function: Callable[[], T],
    timeout: float | None,
    what: str,
    *,
    error: Callable[[str], BaseException] = TimeoutError,
) -> T:
    """``function()``'s result, or its exception, unless it runs longer than ``timeout`` seconds:
    then ``error("WHAT did not finish within TIMEOUT s")`` is raised.

    Works on any thread without signals: ``function`` runs in a daemon thread, joined with the
    timeout, under the caller's grad mode (which torch keeps per thread). A function that
    overruns cannot be stopped; its thread is abandoned, and as a daemon it does not keep the
    process alive. ``timeout=None`` calls ``function`` directly, on this thread.
    """
    if timeout is None:
        return function()
    outcome: dict[str, Any] = {}
    grad_enabled = torch.is_grad_enabled()

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):
                outcome["value"] = function()
        except BaseException as caught:  # re-raised on the caller's thread
            outcome["error"] = caught

    thread = threading.Thread(target=target, name=ABANDONED_THREAD_PREFIX + what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise error(f"{what} did not finish within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
