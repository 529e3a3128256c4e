"""The errors normzoo raises on bad input, and the "did you mean" listing their messages use.

Every error derives from :class:`NormzooError`, itself a ``ValueError``, and its message is one
line that names the bad value and the way out; the command line prints it as it is.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class NormzooError(ValueError):
    """Base class of every error normzoo raises on bad input; its message is one line."""


class UnknownNormError(NormzooError, KeyError):
    """A norm name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownWorkloadError(NormzooError, KeyError):
    """A workload name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OptionError(NormzooError):
    """An unknown option, a value of the wrong type, out of range, or rejected by the norm's
    check against the channel count."""


class LayoutError(NormzooError):
    """A layout the norm does not support, or an input whose shape does not fit the layout."""


class DeclarationError(NormzooError):
    """A plugin declared an invalid norm or workload: bad name, layouts, options, slots or
    factory."""


class DuplicateNormError(NormzooError):
    """Two plugins registered the same norm (or workload) name."""


class BatchSizeError(NormzooError):
    """A training batch too small for a norm that uses batch statistics."""


class NormBuildError(NormzooError):
    """A norm's factory raised, or returned something that is not an ``nn.Module``.

    The factory's own exception is kept as ``__cause__``.
    """


def closest_first(bad: str, valid: Iterable[str]) -> list[str]:
    """Return ``valid`` sorted with the names closest to ``bad`` first, the rest alphabetical."""
    pool = sorted(valid)
    if not pool:
        return []
    close = difflib.get_close_matches(bad, pool, n=len(pool), cutoff=0.5)
    return close + [name for name in pool if name not in close]


#: Up to this many choices, :func:`suggest` lists them all; beyond it, the :data:`CLOSEST`
#: closest and how many more (a page of 1000 variants would otherwise list every label).
LIST_ALL = 25
CLOSEST = 5


def suggest(kind: str, bad: str, valid: Iterable[str]) -> str:
    """One-line message: ``unknown <kind> 'bad'; valid: a, b, c`` (closest match first); of
    more than :data:`LIST_ALL` choices, the :data:`CLOSEST` closest, then ``and N more``."""
    choices = closest_first(bad, valid)
    listing = ", ".join(choices) if choices else "(none)"
    if len(choices) > LIST_ALL:
        listing = f"{', '.join(choices[:CLOSEST])}, and {len(choices) - CLOSEST} more"
    return f"unknown {kind} {bad!r}; valid {kind}s: {listing}"


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message: torch's errors run to many lines, a normzoo
    error is one, and the full text stays on the chained ``__cause__``."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, an exception in one line."""
    return f"{type(error).__name__}: {first_line(error)}".rstrip(": ")


def call_plugin(
    function: Callable[..., T], failure: Callable[[str], NormzooError], *args: Any, **kwargs: Any
) -> T:
    """``function(*args, **kwargs)``, a plugin's code: its own :class:`NormzooError` passes as
    it is (already one line), any other exception becomes ``failure(describe(error))`` with
    the original as ``__cause__``, so a plugin's bug is one line naming the plugin."""
    try:
        return function(*args, **kwargs)
    except NormzooError:
        raise
    except Exception as error:
        raise failure(describe(error)) from error
