"""``normzoo``: the command line. Argument parsing and printing only; the work happens in the
registry (:mod:`normzoo`) and the harness (:mod:`normzoo.harness`).

Each command (or group of small ones) is a module here that adds its parser and handler:
:mod:`~normzoo.cli.run`, :mod:`~normzoo.cli.listing`, :mod:`~normzoo.cli.bench`,
:mod:`~normzoo.cli.covariance`, :mod:`~normzoo.cli.compare`; :mod:`~normzoo.cli.parsing`
holds the argparse pieces they share.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import normzoo
from normzoo.cli import bench, compare, covariance, listing, run
from normzoo.cli.compare import COMPARE_EPILOG
from normzoo.cli.parsing import Parser
from normzoo.errors import NormzooError

__all__ = ["COMPARE_EPILOG", "build_parser", "main"]

EPILOG = """examples:
  normzoo run --norm batchnorm                  the textbook run: LeNet, 10 epochs, lr 1.0
  normzoo run --norm zca --norm-opt group_size=8 --activation relu --lr 0.1
  normzoo list                                  registered norms
  normzoo workloads                             registered workloads (lenet, mlp, ...)
  normzoo run --workload mlp --norm zca         the MLP of the decorrelated-BN experiments
  normzoo info batchnorm                        options, defaults and reference of a norm
  normzoo plugins                               loaded plugins and their load errors
  normzoo run --norm zca --nproc 2              two processes, statistics over the whole batch
  normzoo bench --norms pit,batchnorm           cost as a ratio to torch's batch norm
  normzoo compare docs/exercises/ --jobs 2      run what the pages declare, write the results in
  normzoo compare --check docs/                 are the pages in step with the stored results?
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``normzoo`` parser; each command sets ``handler``, the function that runs it."""
    parser = Parser(
        prog="normzoo",
        description="Normalization layers as plugins, compared in one harness on registered "
        "workloads (the book's LeNet on Fashion-MNIST by default).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"normzoo {normzoo.__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    run.add_command(commands)
    listing.add_commands(commands)
    bench.add_command(commands)
    covariance.add_command(commands)
    compare.add_command(commands)
    parser.set_defaults(command_parsers=commands.choices)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    where = f" ({filename}:{lineno})" if issubclass(category, normzoo.PluginWarning) else ""
    print(f"normzoo: warning: {message}{where}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normzoo`` console script; returns the exit status."""
    warnings.showwarning = _show_warning
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if unknown:  # reported by the command's parser, which names the command's --help
        args.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except NormzooError as error:
        print(f"normzoo: error: {error}", file=sys.stderr)
        return 2
