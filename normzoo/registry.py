"""The registry of norms and workloads: one pluggy plugin manager, entry-point loading with
per-plugin isolation, and the process-wide default registry behind ``normzoo.available`` & co.

Every norm and every workload, bundled or not, comes from a plugin registered under the
entry-point group ``normzoo``. Unlike ``PluginManager.load_setuptools_entrypoints``, which
aborts on the first plugin that fails, :meth:`Registry.load_entry_points` loads each entry
point on its own: a plugin that fails to import (even with ``SystemExit``), whose hook raises,
that implements a hook normzoo does not define (a misspelled name), that registers nothing, or
that declares an invalid or duplicate norm or workload is skipped with a :class:`PluginWarning`
pointing at the plugin's own file, and listed with its error and traceback by
:meth:`Registry.plugins`; the other plugins keep working. A plugin's norms and workloads are
accepted all together or not at all. The bundled plugins load first, so a third-party norm
(or entry point) that claims a bundled name is the one rejected, with an error naming both.

Environment variables:

``NORMZOO_STRICT_PLUGINS=1``
    a plugin failure raises :class:`PluginLoadError` instead of warning, on that call and on
    every later one (for CI and plugin authors);
``NORMZOO_BUILTIN_ONLY=1``
    load only the entry points of the ``normzoo`` distribution itself, skipping third parties;
``NORMZOO_DISABLE=name,...``
    skip the plugins (entry-point names) listed, like pytest's ``-p no:name``.

The two switches take ``1/true/yes/on`` or ``0/false/no/off`` (or empty); anything else is an
error naming the variable.
"""

from __future__ import annotations

import numbers
import os
import sys
import traceback as traceback_module
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import metadata
from typing import Any

import pluggy
from torch import nn

from normzoo import hookspecs
from normzoo.errors import (
    DuplicateNormError,
    NormBuildError,
    NormzooError,
    UnknownNormError,
    UnknownWorkloadError,
    call_plugin,
    describe,
    suggest,
)
from normzoo.interface import FALSE_WORDS, TRUE_WORDS, NormInfo, WorkloadInfo

#: What a plugin registers: norms or workloads.
Declaration = NormInfo | WorkloadInfo

ENTRY_POINT_GROUP = "normzoo"
BUILTIN_DISTRIBUTION = "normzoo"
STRICT_ENV = "NORMZOO_STRICT_PLUGINS"
BUILTIN_ONLY_ENV = "NORMZOO_BUILTIN_ONLY"
DISABLE_ENV = "NORMZOO_DISABLE"

_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed to load or declared invalid norms or workloads."""


class PluginLoadError(NormzooError):
    """A plugin failed to load while strict mode (``NORMZOO_STRICT_PLUGINS=1``) is on."""


def env_flag(name: str) -> bool:
    """The boolean environment variable ``name``; :class:`NormzooError` for other words."""
    word = os.environ.get(name, "").strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS or not word:
        return False
    raise NormzooError(
        f"environment variable {name}={os.environ[name]!r} is not a switch; "
        "use 1/true/yes/on or 0/false/no/off"
    )


def disabled_plugins() -> set[str]:
    """Entry-point names listed in ``NORMZOO_DISABLE`` (comma separated)."""
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def _warn_of_unknown_disabled(disabled: set[str], entry_points: list[Any]) -> None:
    """A name in ``NORMZOO_DISABLE`` that no installed plugin has is most likely a typo, which
    would otherwise leave the plugin it meant loaded without a word."""
    valid = sorted({ep.name for ep in entry_points})
    qualified = {f"{ep.name} ({_distribution_name(ep)})" for ep in entry_points}
    for name in sorted(disabled - set(valid) - qualified):
        warnings.warn(f"{DISABLE_ENV}: {suggest('plugin', name, valid)}", RuntimeWarning, 2)


@dataclass
class PluginRecord:
    """What the registry knows of one plugin: where it came from, its norms and workloads, its
    error.

    ``error`` is the one-line reason a plugin failed, ``exception`` the exception itself and
    ``traceback`` its formatted traceback (``None`` when the failure was detected by the
    registry rather than raised by the plugin, e.g. a misspelled hook). ``disabled`` is true
    for a plugin skipped through ``NORMZOO_DISABLE``.
    """

    name: str
    distribution: str = ""
    version: str = ""
    norms: list[str] = field(default_factory=list)
    workloads: list[str] = field(default_factory=list)
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    traceback: str | None = field(default=None, repr=False)
    disabled: bool = False
    module: str = ""

    @property
    def builtin(self) -> bool:
        """True for the plugins bundled with normzoo itself."""
        return self.distribution == BUILTIN_DISTRIBUTION

    @property
    def failed(self) -> bool:
        """True when the plugin was skipped because of an error."""
        return self.error is not None


class _InlinePlugin:
    """Wraps the declarations given to :meth:`Registry.register` as a plugin."""

    def __init__(self, items: tuple[Declaration, ...]) -> None:
        self.items = items

    @hookspecs.hookimpl
    def normzoo_register_norms(self, register: Callable[[NormInfo], None]) -> None:
        for item in self.items:
            if isinstance(item, NormInfo):
                register(item)

    @hookspecs.hookimpl
    def normzoo_register_workloads(self, register: Callable[[WorkloadInfo], None]) -> None:
        for item in self.items:
            if isinstance(item, WorkloadInfo):
                register(item)


@dataclass
class Registration:
    """Handle returned by :meth:`Registry.register`; :meth:`undo` (or leaving a ``with``
    block) removes the plugin and its norms and workloads again."""

    registry: Registry
    plugin_name: str

    def undo(self) -> None:
        """Unregister the plugin; a second call does nothing."""
        self.registry.unregister(self.plugin_name)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


class _PluginFailure(Exception):
    """A problem the registry itself found in a plugin (no traceback worth showing)."""


class Registry:
    """Norms and workloads by name, gathered from plugins through one
    :class:`pluggy.PluginManager`.

    Parameters
    ----------
    entry_points:
        Load plugins from the ``normzoo`` entry-point group on first use. Pass ``False`` for an
        empty registry filled only through :meth:`register` (useful in tests).
    """

    def __init__(self, entry_points: bool = True) -> None:
        self._manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._manager.add_hookspecs(hookspecs)
        self._norms: dict[str, NormInfo] = {}
        self._workloads: dict[str, WorkloadInfo] = {}
        self._plugins: dict[str, PluginRecord] = {}
        self._needs_entry_points = entry_points
        self._strict_error: PluginLoadError | None = None
        self._inline_count = 0
        self._builtin_only = False

    # -- loading -----------------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._needs_entry_points:
            self._needs_entry_points = False
            self.load_entry_points()
        if self._strict_error is not None:
            raise self._strict_error  # a strict failure stays one: never a partial registry

    def load_entry_points(self) -> None:
        """Load every plugin of the ``normzoo`` entry-point group, each in isolation.

        Raises :class:`PluginLoadError` on the first failure in strict mode, and again on every
        later use of this registry.
        """
        strict = env_flag(STRICT_ENV)
        self._builtin_only = env_flag(BUILTIN_ONLY_ENV)
        disabled = disabled_plugins()
        owners: dict[str, str] = {}  # entry-point name -> distribution that took it
        entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=_load_order)
        _warn_of_unknown_disabled(disabled, entry_points)
        for entry_point in entry_points:
            distribution = _distribution_name(entry_point)
            if self._builtin_only and distribution != BUILTIN_DISTRIBUTION:
                continue
            record = PluginRecord(
                name=entry_point.name,
                distribution=distribution,
                version=entry_point.dist.version if entry_point.dist else "",
                module=entry_point.module,
            )
            owner = owners.get(entry_point.name)
            if owner == distribution:
                continue  # the same distribution seen twice on sys.path
            if owner is not None:
                record.name = f"{entry_point.name} ({distribution})"
            if record.name in disabled:  # a disabled plugin claims no name
                record.disabled = True
                self._plugins[record.name] = record
                continue
            if owner is not None:
                message = (
                    f"entry-point name {entry_point.name!r} of distribution {distribution!r} is "
                    f"already taken by distribution {owner!r}; rename the entry point in one of "
                    f"them, or skip one with {DISABLE_ENV}"
                )
                self._fail(record, message, strict=strict)
                continue
            owners[entry_point.name] = distribution
            try:
                plugin = entry_point.load()
            except (Exception, SystemExit) as error:  # a broken plugin must not take others down
                message = f"import of {entry_point.value!r} failed: {describe(error)}"
                self._fail(record, message, error, strict=strict)
                continue
            self._add_plugin(plugin, record, isolate=True, strict=strict)

    def _fail(
        self,
        record: PluginRecord,
        message: str,
        error: BaseException | None = None,
        strict: bool = False,
    ) -> None:
        record.error = message
        record.norms = []
        record.workloads = []
        if error is not None and not isinstance(error, _PluginFailure):
            record.exception = error
            record.traceback = "".join(traceback_module.format_exception(error))
        self._plugins[record.name] = record
        if strict:
            text = f"normzoo plugin {record.name!r} failed to load ({STRICT_ENV} is on): {message}"
            self._strict_error = PluginLoadError(text)
            if error is not None:
                self._strict_error.__cause__ = error
            raise self._strict_error
        text = f"normzoo plugin {record.name!r} skipped: {message}"
        filename, lineno = _plugin_location(record, error)
        warnings.warn_explicit(text, PluginWarning, filename, lineno, module=record.module or None)

    def _add_plugin(
        self, plugin: Any, record: PluginRecord, isolate: bool, strict: bool = False
    ) -> None:
        """Register ``plugin`` with pluggy, collect its norms and workloads, and commit them all
        or none."""
        try:
            self._manager.register(plugin, name=record.name)
        except Exception as error:
            if not isolate:
                raise
            self._fail(record, describe(error), error, strict=strict)
            return
        try:
            self._check_hooks(plugin, record.name)
            norms = self._collect(plugin, "norm", NormInfo)
            workloads = self._collect(plugin, "workload", WorkloadInfo)
            if not norms and not workloads:
                raise _PluginFailure(
                    "it registers no norm or workload: its hooks called register() zero times"
                )
            for kind, declared, taken in (
                ("norm", norms, self._norms), ("workload", workloads, self._workloads)
            ):  # fmt: skip
                names: set[str] = set()
                for item in declared:
                    item.validate()
                    self._check_unique(kind, item.name, record.name, names, taken)
                    names.add(item.name)
        except (Exception, SystemExit) as error:
            self._manager.unregister(name=record.name)
            if not isolate:
                if isinstance(error, _PluginFailure):
                    raise NormzooError(f"plugin {record.name!r}: {error}") from None
                raise
            message = str(error) if isinstance(error, _PluginFailure) else describe(error)
            self._fail(record, message, error, strict=strict)
            return
        for norm in norms:
            self._norms[norm.name] = replace(norm, plugin=record.name)
            record.norms.append(norm.name)
        for workload in workloads:
            self._workloads[workload.name] = replace(workload, plugin=record.name)
            record.workloads.append(workload.name)
        self._plugins[record.name] = record

    def _collect(self, plugin: Any, kind: str, declaration: type) -> list[Any]:
        """What ``plugin``'s hook for ``kind`` registers; anything but a ``declaration`` is an
        error."""
        collected: list[Any] = []
        hook = getattr(self._manager.hook, hookspecs.HOOKS[kind])
        for implementation in hook.get_hookimpls():
            if implementation.plugin is plugin:
                implementation.function(register=collected.append)
        for item in collected:
            if not isinstance(item, declaration):
                raise NormzooError(
                    f"register() of {hookspecs.HOOKS[kind]} expects a {declaration.__name__}, "
                    f"got {item!r}"
                )
        return collected

    def _check_hooks(self, plugin: Any, name: str) -> None:
        """Reject hook implementations normzoo has no spec for (a misspelled hook name, which
        pluggy's ``check_pending`` would report for the whole manager), and a plugin that
        implements none of normzoo's hooks."""
        callers = self._manager.get_hookcallers(plugin) or []
        unknown = sorted(caller.name for caller in callers if not caller.has_spec())
        hooks = " and ".join(repr(hook) for hook in hookspecs.HOOKS.values())
        if unknown:
            raise _PluginFailure(
                f"it implements unknown hook {unknown[0]!r}; normzoo's hooks are {hooks}"
            )
        if not any(caller.name in hookspecs.HOOKS.values() for caller in callers):
            raise _PluginFailure(
                "it registers no norm or workload: no function decorated with "
                f"@normzoo.hookimpl named {hooks.replace(' and ', ' or ')}"
            )

    def _check_unique(
        self, kind: str, name: str, plugin: str, same_plugin: set[str], taken: dict[str, Any]
    ) -> None:
        if name in same_plugin:
            raise DuplicateNormError(f"plugin {plugin!r} registers {kind} {name!r} twice")
        if name in taken:
            owner = taken[name].plugin
            if self._plugins[owner].distribution:
                way_out = f"uninstall one of them or rename the {kind}"
            else:  # e.g. a notebook cell run twice
                way_out = (
                    f"plugin {owner!r} was registered in this process: call .undo() on the "
                    f"registration it returned (or normzoo.default_registry().unregister("
                    f"{owner!r})) first, or rename the {kind}"
                )
            raise DuplicateNormError(
                f"{kind} {name!r} is registered by both plugin {owner!r} and plugin {plugin!r}; "
                f"{way_out}"
            )

    # -- in-process registration ---------------------------------------------------------------

    def register(self, *items: Declaration | object, name: str | None = None) -> Registration:
        """Register norms, workloads or a plugin object in this process, e.g. from a notebook
        or a test.

        Parameters
        ----------
        items:
            Either :class:`NormInfo` and :class:`WorkloadInfo` objects, or one plugin object (a
            module or instance with a ``normzoo_register_norms`` or
            ``normzoo_register_workloads`` hook implementation).
        name:
            Plugin name shown by ``normzoo plugins``; generated when omitted.

        Returns
        -------
        Registration
            Call ``.undo()`` or use it as a context manager to remove them again.

        Errors (invalid declaration, duplicate name, nothing registered) are raised here, not
        isolated.
        """
        self._ensure_loaded()
        if items and all(isinstance(item, (NormInfo, WorkloadInfo)) for item in items):
            plugin: object = _InlinePlugin(tuple(items))  # type: ignore[arg-type]
        elif len(items) == 1:
            plugin = items[0]
        else:
            raise NormzooError(
                "register() takes NormInfo and WorkloadInfo objects or exactly one plugin object"
            )
        if name is None:
            self._inline_count += 1
            name = f"inline-{self._inline_count}"
        if name in self._plugins:
            raise DuplicateNormError(f"a plugin named {name!r} is already registered")
        self._add_plugin(plugin, PluginRecord(name=name), isolate=False)
        return Registration(self, name)

    def unregister(self, plugin_name: str) -> None:
        """Remove plugin ``plugin_name``, its norms and workloads; unknown names are ignored."""
        record = self._plugins.pop(plugin_name, None)
        if record is None:
            return
        for norm in record.norms:
            self._norms.pop(norm, None)
        for workload in record.workloads:
            self._workloads.pop(workload, None)
        if self._manager.has_plugin(plugin_name):
            self._manager.unregister(name=plugin_name)

    # -- lookup --------------------------------------------------------------------------------

    def available(self) -> list[NormInfo]:
        """Every registered norm, sorted by name."""
        self._ensure_loaded()
        return [self._norms[name] for name in sorted(self._norms)]

    def info(self, name: str) -> NormInfo:
        """The :class:`NormInfo` of ``name``; :class:`UnknownNormError` lists valid names and
        says which plugins failed to load or were skipped, since the norm may be theirs."""
        self._ensure_loaded()
        try:
            return self._norms[name]
        except (KeyError, TypeError):
            message = suggest("norm", str(name), self._norms) + self._missing_plugins_hint()
            raise UnknownNormError(message) from None

    def workloads(self) -> list[WorkloadInfo]:
        """Every registered workload, sorted by name."""
        self._ensure_loaded()
        return [self._workloads[name] for name in sorted(self._workloads)]

    def workload(self, name: str) -> WorkloadInfo:
        """The :class:`WorkloadInfo` of ``name``; :class:`UnknownWorkloadError` lists valid
        names and the plugins that failed to load."""
        self._ensure_loaded()
        try:
            return self._workloads[name]
        except (KeyError, TypeError):
            message = suggest("workload", str(name), self._workloads)
            raise UnknownWorkloadError(message + self._missing_plugins_hint()) from None

    def _missing_plugins_hint(self) -> str:
        hints = []
        failed = [record.name for record in self._plugins.values() if record.failed]
        if failed:
            hints.append(
                f"plugin(s) {', '.join(map(repr, failed))} failed to load (see `normzoo plugins "
                "--verbose`)"
            )
        disabled = [record.name for record in self._plugins.values() if record.disabled]
        if disabled:
            hints.append(f"{DISABLE_ENV} skips {', '.join(map(repr, disabled))}")
        if self._builtin_only:
            hints.append(f"{BUILTIN_ONLY_ENV} is set, so third-party plugins were not loaded")
        return "".join(f"; {hint}" for hint in hints)

    def build(
        self, name: str, num_features: int, layout: str = "conv", **options: Any
    ) -> nn.Module:
        """Build norm ``name`` for ``num_features`` channels in ``layout`` with ``options``.

        Options may be typed values or strings (as from the command line); both are converted
        by the declared option types, then the norm's own :attr:`~NormInfo.check` runs, then
        the factory, with the canonical layout name. Raises :class:`UnknownNormError`,
        :class:`~normzoo.errors.LayoutError`, :class:`~normzoo.errors.OptionError`, or
        :class:`~normzoo.errors.NormBuildError` when the factory raises (the factory's
        exception is the ``__cause__``) or returns something that is not an ``nn.Module``.
        """
        norm = self.info(name)
        layout_name = norm.check_layout(layout)
        if isinstance(num_features, numbers.Integral) and not isinstance(num_features, bool):
            num_features = int(num_features)  # numpy integers too
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise NormzooError(f"num_features must be a positive int, got {num_features!r}")
        resolved = norm.resolve_options(options)
        norm.check_options(resolved, num_features)
        where = f"norm {name!r} (plugin {norm.plugin!r})"
        module = call_plugin(
            norm.factory,
            lambda text: NormBuildError(
                f"{where} failed to build for {num_features} features, layout {layout_name!r}: "
                f"{text}"
            ),
            num_features, layout_name, **resolved,
        )  # fmt: skip
        if not isinstance(module, nn.Module):
            raise NormBuildError(
                f"{where}: its factory returned {type(module).__name__}, not a torch.nn.Module"
            )
        return module

    def plugins(self) -> list[PluginRecord]:
        """Every plugin seen, loaded, failed or disabled, sorted by name."""
        self._ensure_loaded()
        return [self._plugins[name] for name in sorted(self._plugins)]


def _distribution_name(entry_point: metadata.EntryPoint) -> str:
    return entry_point.dist.name if entry_point.dist else ""


def _load_order(entry_point: metadata.EntryPoint) -> tuple[bool, str, str]:
    """Bundled plugins first, so a third party cannot take a bundled norm's name."""
    distribution = _distribution_name(entry_point)
    return (distribution != BUILTIN_DISTRIBUTION, distribution, entry_point.name)


def _plugin_location(record: PluginRecord, error: BaseException | None) -> tuple[str, int]:
    """The file and line a warning about ``record`` should point at: the innermost frame of
    the plugin's own traceback outside Python's import machinery, else the file of its loaded
    module, else the entry point's name. Nothing is imported here: a second import of a broken
    plugin would run its code again, outside any guard."""
    if error is not None and error.__traceback__ is not None:
        for frame in reversed(traceback_module.extract_tb(error.__traceback__)):
            if not frame.filename.startswith("<") and not frame.filename.startswith(_OWN_DIR):
                return frame.filename, frame.lineno or 1
    module = sys.modules.get(record.module) if record.module else None
    filename = getattr(module, "__file__", None)
    return (filename or f"<normzoo plugin {record.name}>"), 1


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry behind the functions below, loaded on first use."""
    return Registry()


def available() -> list[NormInfo]:
    """Every registered norm, sorted by name."""
    return default_registry().available()


def info(name: str) -> NormInfo:
    """The declaration of norm ``name``; raises :class:`UnknownNormError` listing valid names."""
    return default_registry().info(name)


def build(name: str, num_features: int, layout: str = "conv", **options: Any) -> nn.Module:
    """Build norm ``name`` for ``num_features`` channels in ``layout`` (see
    :mod:`normzoo.layouts`: ``fc``, ``conv1d``, ``conv``/``conv2d``, ``conv3d``, ``seq``);
    see :meth:`Registry.build`."""
    return default_registry().build(name, num_features, layout, **options)


def register(*items: Declaration | object, name: str | None = None) -> Registration:
    """Register norms and workloads (or a plugin object) in this process; ``.undo()`` removes
    them again."""
    return default_registry().register(*items, name=name)


def plugins() -> list[PluginRecord]:
    """Every plugin seen, with its distribution, version, norms and load error."""
    return default_registry().plugins()


def available_workloads() -> list[WorkloadInfo]:
    """Every registered workload, sorted by name (not ``workloads``: that name is the package
    :mod:`normzoo.workloads`)."""
    return default_registry().workloads()


def workload(name: str) -> WorkloadInfo:
    """The declaration of workload ``name``; raises :class:`UnknownWorkloadError`."""
    return default_registry().workload(name)
