"""What a plugin declares: a norm (:class:`NormInfo` and its :class:`Option` s) or a workload
(:class:`WorkloadInfo` and its norm :class:`Slot` s), and the validation of both.

A plugin describes each norm it ships with one :class:`NormInfo`: a name, a one-line summary,
the layouts it accepts (see :mod:`normzoo.layouts`), whether it uses batch statistics, its
options, an optional check of the options against the channel count, and a reference, plus a
factory ``factory(num_features, layout, **options) -> nn.Module``. The registry validates the
declaration once, when the plugin registers it; :meth:`NormInfo.resolve_options` and
:meth:`NormInfo.check` validate every build, so factories receive complete, typed, consistent
keyword arguments only.

The options most norms share (:data:`EPS`, :data:`MOMENTUM`, :data:`AFFINE`, :data:`SYNC`) are
declared here,
so that no plugin imports another plugin to reuse them.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from normzoo.errors import (
    BatchSizeError,
    DeclarationError,
    LayoutError,
    NormBuildError,
    NormzooError,
    OptionError,
    suggest,
)
from normzoo.layouts import ALIASES, LAYOUT_NAMES, get_layout

OptionType = type[int] | type[float] | type[bool] | type[str]
NormFactory = Callable[..., nn.Module]
#: ``check(options, num_features)``: raise :class:`OptionError` when the combination is invalid.
NormCheck = Callable[[Mapping[str, Any], int], None]

#: Names the registry passes to every factory itself, so no option may take them.
RESERVED_OPTION_NAMES = frozenset({"num_features", "layout"})

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
#: Words read as true and as false, for bool options and for normzoo's environment switches.
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_NONE_WORDS = {"none", "null"}

__all__ = [
    "AFFINE",
    "EPS",
    "FALSE_WORDS",
    "MOMENTUM",
    "SYNC",
    "TRUE_WORDS",
    "NormInfo",
    "Option",
    "Slot",
    "WorkloadInfo",
    "check_batch_size",
    "check_input",
]


@dataclass(frozen=True)
class Option:
    """One option of a norm: its type, default, one-line help and allowed range.

    Parameters
    ----------
    name:
        Python identifier, passed to the factory as a keyword argument.
    type:
        ``int``, ``float``, ``bool`` or ``str``; command-line strings are converted to it, and
        numpy scalars are accepted for numbers.
    default:
        Value used when the caller gives none; must itself be valid.
    help:
        One line shown by ``normzoo info``.
    minimum, maximum:
        Inclusive bounds for numeric options, ``None`` for unbounded.
    choices:
        Allowed values of a ``str`` option, ``None`` for any string.
    nullable:
        ``None`` (``none`` on the command line) is a valid value, e.g. ``momentum=None`` for a
        cumulative average.
    exclusive_minimum:
        The value must be strictly greater than ``minimum`` (``eps > 0``).

    Float values must be finite: ``nan`` or ``inf`` would pass every range check and make a
    run fail silently.
    """

    name: str
    type: OptionType
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    exclusive_minimum: bool = False

    def convert(self, value: Any, norm: str) -> Any:
        """Return ``value`` as this option's type, checked against its range.

        Strings (from the command line) are parsed; other values must already have the type,
        except that an integer is accepted for a ``float`` option. Raises :class:`OptionError`.
        """
        where = f"option {self.name!r} of norm {norm!r}"
        if value is None or (
            isinstance(value, str) and self.type is not str and value.strip().lower() in _NONE_WORDS
        ):
            if self.nullable:
                return None
            raise OptionError(f"{where} cannot be None; give a {self.type.__name__}")
        if isinstance(value, str) and self.type is not str:
            value = self._parse(value, where)
        value = self._from_number(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise OptionError(
                f"{where} expects {self.type.__name__}, got {value!r} ({type(value).__name__})"
            )
        if self.type is float and not math.isfinite(value):
            raise OptionError(f"{where} must be a finite number, got {value!r}")
        if self.minimum is not None:
            if self.exclusive_minimum and value <= self.minimum:
                raise OptionError(f"{where} must be > {self.minimum}, got {value!r}")
            if value < self.minimum:
                raise OptionError(f"{where} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"{where} must be <= {self.maximum}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{where}: {suggest('value', value, self.choices)}")
        return value

    def _from_number(self, value: Any) -> Any:
        """Plain Python numbers from numpy (or other ``numbers``) scalars of the right kind."""
        if isinstance(value, np.bool_):
            return bool(value) if self.type is bool else value
        if self.type is bool or isinstance(value, bool):
            return value
        if self.type is int and isinstance(value, numbers.Integral):
            return int(value)
        if self.type is float and isinstance(value, numbers.Real):
            return float(value)
        return value

    def _parse(self, text: str, where: str) -> Any:
        if self.type is bool:
            word = text.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise OptionError(f"{where} expects true or false, got {text!r}")
        try:
            value = self.type(text)
        except ValueError:
            raise OptionError(f"{where} expects {self.type.__name__}, got {text!r}") from None
        if self.type is float:
            self._check_representable(value, text, where)
        return value

    _ZERO_LITERAL = re.compile(r"^[+-]?(0+\.?0*|\.0+)(e[+-]?\d+)?$")
    _INF_LITERAL = re.compile(r"^[+-]?inf(inity)?$")

    @classmethod
    def _check_representable(cls, value: float, text: str, where: str) -> None:
        """:class:`OptionError` when ``text`` parsed to 0.0 or an infinity though it does not
        spell one: the number is out of float64's range, and would otherwise be reported as
        the 0 or inf the user never wrote."""
        literal = text.strip().lower().replace("_", "")
        if value == 0.0 and not cls._ZERO_LITERAL.match(literal):
            raise OptionError(
                f"{where}: {text!r} underflows float64 to 0.0; give a number of magnitude at "
                f"least {np.finfo(np.float64).smallest_subnormal:.1e}"
            )
        if math.isinf(value) and not cls._INF_LITERAL.match(literal):
            raise OptionError(
                f"{where}: {text!r} overflows float64 to inf; give a number of magnitude at "
                f"most {np.finfo(np.float64).max:.1e}"
            )

    def describe(self) -> str:
        """``name (type, default X[, range]): help`` for listings."""
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>' if self.exclusive_minimum else '>='} {self.minimum}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum}")
        if self.choices is not None:
            bounds.append("one of " + "|".join(self.choices))
        if self.nullable:
            bounds.append("or none")
        extra = f", {', '.join(bounds)}" if bounds else ""
        return f"{self.name} ({self.type.__name__}, default {self.default!r}{extra}): {self.help}"


#: ``eps``: added to a variance before the square root; strictly positive, since ``eps = 0``
#: divides a constant channel by zero (torch's own batch norm rejects it too). At most 1: the
#: layers a norm sees carry activations of roughly unit variance (the previous norm's output),
#: and an ``eps`` above that variance makes ``x / sqrt(var + eps)`` a division by about
#: ``sqrt(eps)``, a fixed rescaling that no longer normalizes (``eps=1e300`` trains at chance).
#: The bound only refuses values; it changes no default, and ranges are not part of the key
#: of cached results.
EPS = Option(
    "eps", float, 1e-5, "added to the variance before the square root", 0.0, 1.0,
    exclusive_minimum=True,
)  # fmt: skip
#: ``momentum``: weight of the new batch in the running statistics, ``None`` for a cumulative
#: average with equal weights (torch's convention for both).
MOMENTUM = Option(
    "momentum", float, 0.1, "weight of the new batch in the running statistics; none: "
    "cumulative average", 0.0, 1.0, nullable=True,
)  # fmt: skip
#: ``affine``: learn a per-channel scale and shift after normalizing; ``False`` keeps them at
#: 1 and 0 (``normzoo run --freeze-affine``).
AFFINE = Option("affine", bool, True, "learn a per-channel scale (gamma) and shift (beta)")
#: ``sync``: in train mode, batch statistics over the global batch of every process when
#: torch.distributed runs several (see :mod:`normzoo.distributed`); no effect in one process.
SYNC = Option(
    "sync", bool, True, "batch statistics over all processes' batches under torch.distributed"
)


def _check_name_and_summary(kind: str, name: Any, summary: Any) -> None:
    """A declared name is lowercase words joined by dashes; its summary is one line."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise DeclarationError(
            f"invalid {kind} name {name!r}: use lowercase letters and digits joined by dashes, "
            f"e.g. 'my-{kind}'"
        )
    if not isinstance(summary, str) or not summary or "\n" in summary:
        raise DeclarationError(f"{kind} {name!r} needs a one-line summary")


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
        The layouts the factory accepts: names from :data:`normzoo.layouts.LAYOUTS` (an alias
        such as ``conv2d`` is stored as its canonical name).
    uses_batch_stats:
        True when the output of an example in ``train()`` mode depends on the rest of the batch.
        Such a norm must reject a training batch with a single value per channel.
    factory:
        ``factory(num_features, layout, **options) -> nn.Module``; receives the canonical layout
        name and every declared option, converted and checked. It must accept each declared
        option as a keyword argument (checked at registration).
    options:
        The declared options; the factory gets exactly these keyword arguments. ``layout`` and
        ``num_features`` are reserved.
    reference:
        Paper or book section the norm follows.
    check:
        Optional ``check(options, num_features)`` run by ``build`` after the options are
        resolved and before the factory; raises :class:`OptionError` for a combination that
        cannot work, e.g. ``groups`` that does not divide ``num_features``.
    version:
        The version of the norm's math, bumped by its plugin whenever a change alters what the
        norm computes (results cached by comparisons are keyed by it).
    exact_train_gradient:
        False for a norm whose train-mode gradient is, by its design, not the derivative of its
        output (Batch Renormalization holds its corrections ``r`` and ``d`` constant in the
        backward pass): the conformance suite then compares gradients with finite differences
        in eval mode only, and the plugin's own tests must prove its train-mode gradient.
    plugin:
        Name of the plugin that registered it; filled in by the registry.
    """

    name: str
    summary: str
    layouts: tuple[str, ...]
    uses_batch_stats: bool
    factory: NormFactory
    options: tuple[Option, ...] = ()
    reference: str = ""
    check: NormCheck | None = None
    version: str = "1"
    exact_train_gradient: bool = True
    plugin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.layouts, tuple) and all(isinstance(x, str) for x in self.layouts):
            object.__setattr__(self, "layouts", tuple(ALIASES.get(x, x) for x in self.layouts))

    def validate(self) -> None:
        """Check the declaration itself; raise :class:`DeclarationError` naming what is wrong."""
        where = f"norm {self.name!r}"
        _check_name_and_summary("norm", self.name, self.summary)
        if (
            not isinstance(self.layouts, tuple)
            or not self.layouts
            or any(layout not in LAYOUT_NAMES for layout in self.layouts)
        ):
            raise DeclarationError(
                f"{where} declares layouts {self.layouts!r}; choose from a tuple of "
                f"{', '.join(LAYOUT_NAMES)}"
            )
        if not callable(self.factory):
            raise DeclarationError(f"{where} has a factory that is not callable")
        if self.check is not None and not callable(self.check):
            raise DeclarationError(f"{where} has a check that is not callable")
        if not isinstance(self.version, str) or not self.version:
            raise DeclarationError(f"{where} needs a non-empty version string")
        seen: set[str] = set()
        for option in self.options:
            if not isinstance(option, Option):
                raise DeclarationError(f"{where} declares {option!r}, not a normzoo.Option")
            if not option.name.isidentifier() or option.name in seen:
                raise DeclarationError(f"{where} declares a bad or repeated option {option.name!r}")
            if option.name in RESERVED_OPTION_NAMES:
                raise DeclarationError(
                    f"{where} declares option {option.name!r}, a name the registry passes to "
                    "every factory itself; rename the option"
                )
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
        self._validate_factory_signature()

    def _validate_factory_signature(self) -> None:
        """The factory must accept ``(num_features, layout, **options)``, as ``build`` calls it,
        and a default it declares for an option must be the option's: ``build`` always passes
        the :class:`Option`'s default, so a second one in the signature is a fact kept twice
        that only direct calls of the factory would see, and nothing else keeps them equal."""
        try:
            signature = inspect.signature(self.factory)
        except (TypeError, ValueError):
            return  # builtins and some C callables have no signature to check
        keywords = {option.name: option.default for option in self.options}
        for name, default in keywords.items():
            parameter = signature.parameters.get(name)
            if parameter is None or parameter.default is inspect.Parameter.empty:
                continue
            if parameter.default != default or isinstance(parameter.default, bool) != isinstance(
                default, bool
            ):
                raise DeclarationError(
                    f"norm {self.name!r}: option {name!r} defaults to {default!r} in its Option "
                    f"but to {parameter.default!r} in the factory's signature; drop the "
                    "signature's default (build passes the Option's) or make them equal"
                )
        try:
            signature.bind(1, "fc", **keywords)
        except TypeError as error:
            raise DeclarationError(
                f"norm {self.name!r}: factory {getattr(self.factory, '__qualname__', self.factory)}"
                f"{signature} cannot be called as factory(num_features, layout, "
                f"{', '.join(keywords) + ', ' if keywords else ''}...): {error}"
            ) from None

    def option(self, name: str) -> Option:
        """The declared option ``name``; :class:`OptionError` lists the valid ones otherwise."""
        for option in self.options:
            if option.name == name:
                return option
        if name in RESERVED_OPTION_NAMES:
            raise OptionError(
                f"norm {self.name!r}: {name!r} is not an option but an argument of build(); "
                f"options: {', '.join(o.name for o in self.options) or '(none)'}"
            )
        valid = [option.name for option in self.options]
        raise OptionError(f"norm {self.name!r}: {suggest('option', name, valid)}")

    def has_option(self, name: str) -> bool:
        """True when the norm declares option ``name``."""
        return any(option.name == name for option in self.options)

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``given`` over the defaults, converting and checking each value."""
        resolved = {option.name: option.default for option in self.options}
        for key, value in given.items():
            resolved[key] = self.option(key).convert(value, self.name)
        return resolved

    def check_options(self, options: Mapping[str, Any], num_features: int) -> None:
        """Run the declared :attr:`check` on resolved ``options``; it raises :class:`OptionError`.

        Any other exception from the check is a bug of the plugin and is reported as a
        :class:`NormBuildError` naming the norm.
        """
        if self.check is None:
            return
        try:
            self.check(options, num_features)
        except NormzooError:
            raise
        except Exception as error:
            raise NormBuildError(
                f"the option check of norm {self.name!r} raised {type(error).__name__}: {error}"
            ) from error

    def check_layout(self, layout: str) -> str:
        """The canonical name of ``layout``; :class:`LayoutError` unless the norm supports it."""
        name = get_layout(layout).name
        if name not in self.layouts:
            raise LayoutError(
                f"norm {self.name!r} does not support layout {layout!r}; "
                f"supported: {', '.join(self.layouts)}"
            )
        return name


def check_input(x: Any, num_features: int, layout: str, norm: str) -> None:
    """Raise :class:`LayoutError` unless ``x`` fits ``layout`` with ``num_features`` channels.

    Norm modules call this first so that a wrong shape is reported in normzoo's words (naming
    the norm, the layout and the shape) rather than as a broadcasting error from deep inside
    torch.
    """
    get_layout(layout).check_input(x, num_features, norm)


def check_batch_size(x: Any, norm: str, layout: str, values: float | None = None) -> None:
    """Raise :class:`BatchSizeError` when a training batch has fewer than 2 values per channel.

    Batch statistics of a single value are meaningless (its variance is 0), so a norm that
    uses them refuses such a batch rather than silently returning zeros. ``values`` is the
    count over all processes when the statistics are global (this process may hold none).
    """
    where = ""
    if values is None:
        values = get_layout(layout).values_per_channel(x) if x.numel() else 0
    else:
        where = " over all processes"
    if values < 2:
        raise BatchSizeError(
            f"{norm} uses batch statistics and needs more than 1 value per channel{where} in "
            f"train mode, got input of shape {tuple(x.shape)}; use a larger batch or call "
            ".eval()"
        )


#: ``factory(slots) -> nn.Module``: builds a workload's model, putting a norm in each slot
#: through the :class:`~normzoo.workloads.slots.NormSlots` it is given.
WorkloadFactory = Callable[[Any], nn.Module]
#: ``data(data_dir, download)``: the workload's data, a :class:`~normzoo.workloads.data.Dataset`.
WorkloadData = Callable[[Any, bool], Any]


@dataclass(frozen=True)
class Slot:
    """A place in a workload's model where a norm goes.

    Parameters
    ----------
    name:
        Identifies the slot, e.g. ``"conv1"``; also names its case in ``normzoo bench``.
    channels:
        The channel count ``C`` of the norm built there.
    layout:
        The layout of the norm's input (see :mod:`normzoo.layouts`); a norm fits the workload
        when it declares every slot's layout. ``normzoo run --placement LAYOUT`` puts norms in
        the slots of that layout only.
    spatial:
        The spatial (or sequence) size of the norm's input, without batch and channels:
        ``(24, 24)`` for a conv slot on 24x24 maps, ``()`` for ``fc``. ``normzoo bench`` times
        one norm layer alone on an input of this size.
    """

    name: str
    channels: int
    layout: str
    spatial: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.layout, str):
            object.__setattr__(self, "layout", ALIASES.get(self.layout, self.layout))

    def input_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of the norm's input for ``batch`` examples, in the slot's layout (channels
        last for ``seq``)."""
        layout = get_layout(self.layout)
        sizes = [batch, *self.spatial]
        sizes.insert(layout.channel_axis, self.channels)
        return tuple(sizes)

    def validate(self, workload: str) -> None:
        where = f"workload {workload!r}: slot {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise DeclarationError(f"workload {workload!r}: bad slot name {self.name!r}")
        if (
            not isinstance(self.channels, int)
            or isinstance(self.channels, bool)
            or (self.channels < 1)
        ):
            raise DeclarationError(f"{where} needs a positive int channel count")
        if self.layout not in LAYOUT_NAMES:
            raise DeclarationError(
                f"{where} declares layout {self.layout!r}; choose from {', '.join(LAYOUT_NAMES)}"
            )
        sizes = get_layout(self.layout).ndim - 2
        if (
            not isinstance(self.spatial, tuple)
            or len(self.spatial) != sizes
            or not all(type(size) is int and size > 0 for size in self.spatial)
        ):
            raise DeclarationError(
                f"{where} needs spatial as a tuple of {sizes} positive sizes for layout "
                f"{self.layout!r}, got {self.spatial!r}"
            )


@dataclass(frozen=True)
class WorkloadInfo:
    """A workload as a plugin declares it: a model with norm slots, and its data.

    Parameters
    ----------
    name:
        Lowercase words joined by dashes, e.g. ``"lenet"``; unique across plugins.
    summary:
        One line for ``normzoo workloads``.
    slots:
        The norm slots of the model, in the order the model uses them.
    factory:
        ``factory(slots) -> nn.Module``: builds the model, taking each norm (with its
        activation) from ``slots.block(slot_name, layer)``; see
        :class:`~normzoo.workloads.slots.NormSlots`. The model maps the data's images to
        class logits.
    data:
        ``data(data_dir, download)``: the train and test splits as a
        :class:`~normzoo.workloads.data.Dataset`; ``data_dir`` ``None`` means the workload's
        default (for the bundled workloads, the Fashion-MNIST copy bundled with normzoo).
    reference:
        Where the model comes from.
    version:
        The version of what the workload computes, bumped whenever a change alters its numbers
        (results cached by comparisons are keyed by it).
    defaults:
        The run settings the workload was tuned with, e.g. ``{"lr": 0.3, "activation":
        "relu"}``: a run or a page that does not set one of them gets the workload's value
        instead of the harness's default (the chapter's LeNet settings, which suit no other
        model). Keys are run settings (``normzoo run``'s options with underscores), checked
        when a run is configured (:meth:`normzoo.harness.config.RunConfig.for_workload`).
    plugin:
        Name of the plugin that registered it; filled in by the registry.
    """

    name: str
    summary: str
    slots: tuple[Slot, ...]
    factory: WorkloadFactory
    data: WorkloadData
    reference: str = ""
    version: str = "1"
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    plugin: str = field(default="", compare=False)

    @property
    def layouts(self) -> tuple[str, ...]:
        """The layouts of the slots, each once, in order of first use."""
        return tuple(dict.fromkeys(slot.layout for slot in self.slots))

    def slot(self, name: str) -> Slot:
        """The slot ``name``; :class:`NormzooError` lists the valid ones otherwise."""
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise NormzooError(
            f"workload {self.name!r}: {suggest('slot', name, [s.name for s in self.slots])}"
        )

    def validate(self) -> None:
        """Check the declaration itself; raise :class:`DeclarationError` naming what is wrong."""
        where = f"workload {self.name!r}"
        _check_name_and_summary("workload", self.name, self.summary)
        if not isinstance(self.slots, tuple) or not self.slots:
            raise DeclarationError(f"{where} needs a non-empty tuple of Slots")
        names: set[str] = set()
        for slot in self.slots:
            if not isinstance(slot, Slot):
                raise DeclarationError(f"{where} declares {slot!r}, not a normzoo.Slot")
            slot.validate(self.name)
            if slot.name in names:
                raise DeclarationError(f"{where} declares slot {slot.name!r} twice")
            names.add(slot.name)
        for part in ("factory", "data"):
            if not callable(getattr(self, part)):
                raise DeclarationError(f"{where} has a {part} that is not callable")
        if not isinstance(self.version, str) or not self.version:
            raise DeclarationError(f"{where} needs a non-empty version string")
        if not isinstance(self.defaults, Mapping) or not all(
            isinstance(key, str) and key.isidentifier() for key in self.defaults
        ):
            raise DeclarationError(
                f"{where} needs defaults as a mapping of run settings (e.g. {{'lr': 0.3}}), got "
                f"{self.defaults!r}"
            )
        for key, value in self.defaults.items():
            if not isinstance(value, (str, int, float, bool)):
                raise DeclarationError(
                    f"{where}: default {key}={value!r} is not a str, int, float or bool"
                )
