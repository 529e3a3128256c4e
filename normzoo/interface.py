"""What a norm plugin declares: :class:`NormInfo`, its :class:`Option` s, and their validation.

A plugin describes each norm it ships with one :class:`NormInfo`: a name, a one-line summary,
the layouts it accepts, whether it uses batch statistics, its options and a reference, plus a
factory ``factory(num_features, layout, **options) -> nn.Module``. The registry validates the
declaration once, when the plugin registers it; :meth:`NormInfo.resolve_options` validates the
options of every build, so factories receive complete, typed keyword arguments only.

Layouts:

``fc``
    input of shape ``(N, C)``, the output of a linear layer;
``conv``
    input of shape ``(N, C, H, W)``, the output of a 2-d convolution.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

Layout = Literal["fc", "conv"]
LAYOUTS: tuple[Layout, ...] = ("fc", "conv")
#: Number of input dimensions of each layout, for input checks in norm modules.
LAYOUT_NDIM: dict[str, int] = {"fc": 2, "conv": 4}

OptionType = type[int] | type[float] | type[bool] | type[str]
NormFactory = Callable[..., nn.Module]

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class NormzooError(ValueError):
    """Base class of every error normzoo raises on bad input; its message is one line."""


class UnknownNormError(NormzooError, KeyError):
    """A norm name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OptionError(NormzooError):
    """An unknown option, a value of the wrong type, or a value out of range."""


class LayoutError(NormzooError):
    """A layout the norm does not support, or an input whose shape does not fit the layout."""


class DeclarationError(NormzooError):
    """A plugin declared an invalid norm: bad name, layouts, options or factory."""


class DuplicateNormError(NormzooError):
    """Two plugins registered the same norm name."""


class BatchSizeError(NormzooError):
    """A training batch too small for a norm that uses batch statistics."""


def closest_first(bad: str, valid: Iterable[str]) -> list[str]:
    """Return ``valid`` sorted with the names closest to ``bad`` first, the rest alphabetical."""
    pool = sorted(valid)
    if not pool:
        return []
    close = difflib.get_close_matches(bad, pool, n=len(pool), cutoff=0.5)
    return close + [name for name in pool if name not in close]


def suggest(kind: str, bad: str, valid: Iterable[str]) -> str:
    """One-line message: ``unknown <kind> 'bad'; valid: a, b, c`` (closest match first)."""
    choices = closest_first(bad, valid)
    listing = ", ".join(choices) if choices else "(none)"
    return f"unknown {kind} {bad!r}; valid {kind}s: {listing}"


@dataclass(frozen=True)
class Option:
    """One option of a norm: its type, default, one-line help and allowed range.

    Parameters
    ----------
    name:
        Python identifier, passed to the factory as a keyword argument.
    type:
        ``int``, ``float``, ``bool`` or ``str``; command-line strings are converted to it.
    default:
        Value used when the caller gives none; must itself be valid.
    help:
        One line shown by ``normzoo info``.
    minimum, maximum:
        Inclusive bounds for numeric options, ``None`` for unbounded.
    choices:
        Allowed values of a ``str`` option, ``None`` for any string.
    """

    name: str
    type: OptionType
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None

    def convert(self, value: Any, norm: str) -> Any:
        """Return ``value`` as this option's type, checked against its range.

        Strings (from the command line) are parsed; other values must already have the type,
        except that an ``int`` is accepted for a ``float`` option. Raises :class:`OptionError`.
        """
        where = f"option {self.name!r} of norm {norm!r}"
        if isinstance(value, str) and self.type is not str:
            value = self._parse(value, where)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise OptionError(
                f"{where} expects {self.type.__name__}, got {value!r} ({type(value).__name__})"
            )
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"{where} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"{where} must be <= {self.maximum}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{where}: {suggest('value', value, self.choices)}")
        return value

    def _parse(self, text: str, where: str) -> Any:
        if self.type is bool:
            word = text.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
            raise OptionError(f"{where} expects true or false, got {text!r}")
        try:
            return self.type(text)
        except ValueError:
            raise OptionError(f"{where} expects {self.type.__name__}, got {text!r}") from None

    def describe(self) -> str:
        """``name (type, default X[, range]): help`` for listings."""
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum}")
        if self.choices is not None:
            bounds.append("one of " + "|".join(self.choices))
        extra = f", {', '.join(bounds)}" if bounds else ""
        return f"{self.name} ({self.type.__name__}, default {self.default!r}{extra}): {self.help}"


@dataclass(frozen=True)
class NormInfo:
    """A norm as a plugin declares it.

    Parameters
    ----------
    name:
        Lowercase words joined by dashes, e.g. ``"torch-batchnorm"``; unique across plugins.
    summary:
        One line for ``normzoo list``.
    layouts:
        The layouts the factory accepts, a non-empty subset of ``("fc", "conv")``.
    uses_batch_stats:
        True when the output of an example in ``train()`` mode depends on the rest of the batch.
        Such a norm must reject a training batch with a single value per channel.
    factory:
        ``factory(num_features, layout, **options) -> nn.Module``; receives every declared
        option, converted and checked.
    options:
        The declared options; the factory gets exactly these keyword arguments.
    reference:
        Paper or book section the norm follows.
    plugin:
        Name of the plugin that registered it; filled in by the registry.
    """

    name: str
    summary: str
    layouts: tuple[Layout, ...]
    uses_batch_stats: bool
    factory: NormFactory
    options: tuple[Option, ...] = ()
    reference: str = ""
    plugin: str = field(default="", compare=False)

    def validate(self) -> None:
        """Check the declaration itself; raise :class:`DeclarationError` naming what is wrong."""
        where = f"norm {self.name!r}"
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise DeclarationError(
                f"invalid norm name {self.name!r}: use lowercase letters and digits joined by "
                "dashes, e.g. 'my-norm'"
            )
        if not self.summary or "\n" in self.summary:
            raise DeclarationError(f"{where} needs a one-line summary")
        if not self.layouts or any(layout not in LAYOUTS for layout in self.layouts):
            raise DeclarationError(
                f"{where} declares layouts {self.layouts!r}; choose from {', '.join(LAYOUTS)}"
            )
        if not callable(self.factory):
            raise DeclarationError(f"{where} has a factory that is not callable")
        seen: set[str] = set()
        for option in self.options:
            if not option.name.isidentifier() or option.name in seen:
                raise DeclarationError(f"{where} declares a bad or repeated option {option.name!r}")
            if option.type not in (int, float, bool, str):
                raise DeclarationError(
                    f"{where}: option {option.name!r} has type {option.type!r}; "
                    "use int, float, bool or str"
                )
            seen.add(option.name)
            try:
                option.convert(option.default, self.name)
            except OptionError as error:
                raise DeclarationError(f"{where}: invalid default: {error}") from None

    def option(self, name: str) -> Option:
        """The declared option ``name``; :class:`OptionError` lists the valid ones otherwise."""
        for option in self.options:
            if option.name == name:
                return option
        valid = [option.name for option in self.options]
        raise OptionError(f"norm {self.name!r}: {suggest('option', name, valid)}")

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``given`` over the defaults, converting and checking each value."""
        resolved = {option.name: option.default for option in self.options}
        for key, value in given.items():
            resolved[key] = self.option(key).convert(value, self.name)
        return resolved

    def check_layout(self, layout: str) -> None:
        """Raise :class:`LayoutError` unless ``layout`` is one this norm supports."""
        if layout not in self.layouts:
            raise LayoutError(
                f"norm {self.name!r} does not support layout {layout!r}; "
                f"supported: {', '.join(self.layouts)}"
            )


def check_input(x: Any, num_features: int, layout: str, norm: str) -> None:
    """Raise :class:`LayoutError` unless ``x`` is ``(N, C)`` / ``(N, C, H, W)`` with C features.

    Norm modules call this first so that a wrong shape is reported in normzoo's words rather
    than as a broadcasting error from deep inside torch.
    """
    expected = "(N, C)" if layout == "fc" else "(N, C, H, W)"
    if x.dim() != LAYOUT_NDIM[layout] or x.shape[1] != num_features:
        raise LayoutError(
            f"{norm} built for layout {layout!r} with {num_features} features expects input "
            f"{expected} with C={num_features}, got shape {tuple(x.shape)}"
        )


def check_batch_size(x: Any, norm: str) -> None:
    """Raise :class:`BatchSizeError` when a training batch has fewer than 2 values per channel.

    Batch statistics of a single value are meaningless (its variance is 0), so a norm that
    uses them refuses such a batch rather than silently returning zeros.
    """
    values_per_channel = x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0
    if values_per_channel < 2:
        raise BatchSizeError(
            f"{norm} uses batch statistics and needs more than 1 value per channel in train "
            f"mode, got input of shape {tuple(x.shape)}; use a larger batch or call .eval()"
        )
