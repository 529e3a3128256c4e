"""Ctrl-C and SIGTERM: one exception for both, and one helper for every signal handler.

``kill``, a batch scheduler or a container stop send SIGTERM, whose default action kills the
process on the spot: a run's ``metrics.json`` would say ``running`` forever, and a launcher's
processes would train on as orphans. Everything in normzoo that has to answer a stop
(a run, the multi-process launcher, ``normzoo compare``'s pool) installs its handler through
:func:`signals_handled`, which restores the previous handlers afterwards and does nothing
outside the main thread (Python allows signal handlers only there).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

#: The signals that stop a run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a run, or code raised :class:`KeyboardInterrupt`.

    A :class:`KeyboardInterrupt`, so code that stops on Ctrl-C stops on it too. ``directory``
    is the run directory, whose ``metrics.json`` says ``interrupted`` (``None`` when the run
    was stopped before its directory existed); ``signal_number`` is the signal, ``None`` when
    no signal came: a plugin (or a callback) raised ``KeyboardInterrupt`` itself.
    """

    def __init__(
        self, message: str, signal_number: int | None, directory: Path | None = None
    ) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.directory = directory

    def __reduce__(self) -> tuple:  # from a worker process to its parent, whole
        message = self.args[0] if self.args else ""
        return type(self), (message, self.signal_number, self.directory), self.__dict__


def interruption_message(signal_number: int, finished_epochs: int) -> str:
    """What ``metrics.json`` and the terminal say of a run that signal ``signal_number`` ended."""
    verb = "interrupted" if signal_number == signal.SIGINT else "terminated"
    return f"{verb} by {signal.Signals(signal_number).name} after {finished_epochs} finished epochs"


def raised_where(error: BaseException) -> str:
    """Where ``error`` was raised: the innermost frame of its traceback, as
    ``function (file:line)``."""
    traceback: TracebackType | None = error.__traceback__
    if traceback is None:
        return "an unknown place"
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    code = traceback.tb_frame.f_code
    return f"{code.co_name} ({Path(code.co_filename).name}:{traceback.tb_lineno})"


def raised_interruption_message(error: BaseException, finished_epochs: int | None = None) -> str:
    """What ``metrics.json`` and the terminal say of a run that a :class:`KeyboardInterrupt`
    ended which no signal sent: code raised it."""
    after = "" if finished_epochs is None else f" after {finished_epochs} finished epochs"
    return (
        f"interrupted by a KeyboardInterrupt raised in {raised_where(error)}, not by Ctrl-C or "
        f"a signal{after}"
    )


def mark_reported(error: BaseException) -> None:
    """Note on ``error`` (a :class:`KeyboardInterrupt`) that the user has been told about it,
    so that the command line does not say it again."""
    error.normzoo_reported = True  # type: ignore[attr-defined]


def was_reported(error: BaseException) -> bool:
    """Whether :func:`mark_reported` was called on ``error``."""
    return getattr(error, "normzoo_reported", False) is True


def signal_number_of(error: BaseException) -> int | None:
    """The signal that raised ``error`` (a :class:`KeyboardInterrupt`), or ``None`` when code
    raised it. Within :func:`stops_interrupt`, SIGINT and SIGTERM raise
    :class:`RunInterrupted` carrying their number; a bare ``KeyboardInterrupt`` there came
    from a ``raise``."""
    return getattr(error, "signal_number", None)


@contextmanager
def signals_handled(
    handler: Callable[[int, object], object], numbers: tuple[int, ...] = STOP_SIGNALS
) -> Iterator[None]:
    """Answer the signals ``numbers`` with ``handler(number, frame)`` for the block (outside
    the main thread, leave them to the caller)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in numbers}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _raise_interrupt(signal_number: int, frame: object) -> None:
    raise RunInterrupted(f"stopped by {signal.Signals(signal_number).name}", signal_number)


@contextmanager
def stops_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`RunInterrupted` carrying the signal in the block: both
    unwind through the code that records the run, which can tell them from a
    ``KeyboardInterrupt`` that code raised (see :func:`signal_number_of`).

    SIGINT is answered only where Python's default handler (which raises a bare
    ``KeyboardInterrupt``) would have answered it: a process that ignores it (the launcher's
    processes leave Ctrl-C to the launcher) keeps ignoring it.
    """
    numbers: tuple[int, ...] = (signal.SIGTERM,)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        numbers = (signal.SIGINT, signal.SIGTERM)
    with signals_handled(_raise_interrupt, numbers):
        yield


@contextmanager
def stops_deferred() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM off for the block; yields the list of those that arrived.

    While the final files or a final status are being written, an interrupt would leave them
    inconsistent with each other or with what the command line prints (``metrics.json`` says
    ``finished`` while the terminal says ``interrupted``). The block is short; a signal that
    arrives during it is recorded, and the caller decides what it means.
    """
    received: list[int] = []
    with signals_handled(lambda number, frame: received.append(number)):
        yield received
