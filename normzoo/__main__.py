"""``python -m normzoo`` and the ``normzoo`` console script (:func:`entry`).

Ctrl-C while the command line is still starting up (importing torch and the plugins takes
seconds) prints one line and exits 130, as it does once a command runs, not a traceback.
"""

import signal
import sys


def entry() -> int:
    """The ``normzoo`` command: :func:`normzoo.cli.main`, imported here so that an interrupt
    during its imports is answered like one during the command.

    ``import normzoo`` (the package, which imports torch) comes before any function of the
    package can run; an interrupt during it still shows Python's traceback.
    """
    try:
        from normzoo.cli import main

        return main()
    except KeyboardInterrupt as error:
        print("normzoo: interrupted", file=sys.stderr)
        number = getattr(error, "signal_number", signal.SIGINT)
        return 1 if number is None else 128 + number


if __name__ == "__main__":
    sys.exit(entry())
