"""The ``normzoo`` console script (:func:`entry`).

It lives outside the ``normzoo`` package on purpose: importing the package imports torch and
the plugins, which takes seconds, and an interrupt during an import that comes before any of
the script's code can run would show Python's traceback. From here every import of normzoo runs
inside :func:`entry`, so Ctrl-C at any moment of start-up prints one line and exits 130, as it
does once a command runs.
"""

import signal
import sys


def entry() -> int:
    """Run :func:`normzoo.cli.main`; an interrupt during its imports or its work is one line and
    the exit status ``128 + signal`` (1 for a ``KeyboardInterrupt`` that no signal raised)."""
    try:
        from normzoo.cli import main

        return main()
    except KeyboardInterrupt as error:
        print("normzoo: interrupted", file=sys.stderr)
        number = getattr(error, "signal_number", signal.SIGINT)
        return 1 if number is None else 128 + number


if __name__ == "__main__":
    sys.exit(entry())
