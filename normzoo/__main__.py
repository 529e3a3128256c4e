"""``python -m normzoo``: the ``normzoo`` command.

Python imports the package (torch and the plugins) before this module runs, so Ctrl-C in
those first seconds shows Python's traceback here; the ``normzoo`` script
(:mod:`normzoo_command`) answers it with one line.
"""

import sys

from normzoo_command import entry

if __name__ == "__main__":
    sys.exit(entry())
