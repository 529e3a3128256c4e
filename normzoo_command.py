"""The ``normzoo`` console script (:func:`entry`).

It lives outside the ``normzoo`` package on purpose: importing the package imports torch and
the plugins, which takes seconds, and an interrupt during an import that comes before any of
the script's code can run would show Python's traceback. From here every import of normzoo runs
inside :func:`entry`, so Ctrl-C at any moment of start-up prints one line and exits 130, as it
does once a command runs.

While the command line module imports torch, Ctrl-C is held back until the import is done: a
``KeyboardInterrupt`` raised inside torch's C++ start-up code aborts the process ("terminate
called ...", exit 134) or is swallowed by it, so the command ran on as if never interrupted.
"""

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _interrupt_held_back() -> Iterator[list[int]]:
    """Record SIGINT instead of raising it inside the block; the list says whether it came."""
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    except ValueError:  # not the main thread: nothing to hold back
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def entry() -> int:
    """Run :func:`normzoo.cli.main`; an interrupt during its imports or its work is one line and
    the exit status ``128 + signal`` (1 for a ``KeyboardInterrupt`` that no signal raised)."""
    try:
        with _interrupt_held_back() as received:
            from normzoo.cli import main
        if received:
            raise KeyboardInterrupt
        code = main()
    except KeyboardInterrupt as error:
        print("normzoo: interrupted", file=sys.stderr)
        number = getattr(error, "signal_number", signal.SIGINT)
        code = 1 if number is None else 128 + number
    return _leave(code)


def _leave(code: int) -> int:
    """``code``, or the process ends here with it when a thread that normzoo abandoned (a norm
    that never returned) still runs: at interpreter exit it would still be inside torch, which
    then aborts the process."""
    testing = sys.modules.get("normzoo.testing")  # where such threads are started
    prefix = getattr(testing, "ABANDONED_THREAD_PREFIX", None)
    if prefix and any(thread.name.startswith(prefix) and thread.is_alive()
                      for thread in threading.enumerate()):  # fmt: skip
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
