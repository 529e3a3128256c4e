"""The argparse pieces every ``normzoo`` command shares: a parser whose errors are one line,
a help formatter, and the positive-integer argument type."""

from __future__ import annotations

import argparse
import textwrap
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other normzoo error.

    argparse prints the whole usage block before its message, which buries the one line that
    matters; the usage is one ``--help`` away, and the message says so.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"normzoo: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where it tells something, and keeps indented blocks of a text as written.

    A flag's ``False``, a ``None`` that means "not given" and an empty list say nothing that the
    help text does not; an indented block (an example page, a command) must not be re-wrapped.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            textwrap.indent(block, indent) if block.startswith("  ") else
            textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                          subsequent_indent=indent)
            for block in text.split("\n\n")
        )  # fmt: skip


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
