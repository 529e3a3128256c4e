"""The norm registry: one pluggy plugin manager, entry-point loading with per-plugin isolation.

Every norm, bundled or not, comes from a plugin registered under the entry-point group
``normzoo``. Unlike ``PluginManager.load_setuptools_entrypoints``, which aborts on the first
plugin that fails, :meth:`Registry.load` loads each entry point on its own: a plugin that fails
to import, whose hook raises, or that declares an invalid or duplicate norm is skipped with a
:class:`PluginWarning` and listed with its error by :meth:`Registry.plugins`; the other plugins
keep working. A plugin's norms are accepted all together or not at all. The bundled plugins
load first, so a third-party norm that claims a bundled name is the one rejected.

Environment variables:

``NORMZOO_STRICT_PLUGINS=1``
    a plugin failure raises :class:`PluginLoadError` instead of warning (for CI and plugin
    authors);
``NORMZOO_BUILTIN_ONLY=1``
    load only the entry points of the ``normzoo`` distribution itself, skipping third parties.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import pluggy
from torch import nn

from normzoo import hookspecs
from normzoo.interface import (
    DuplicateNormError,
    LayoutError,
    NormInfo,
    NormzooError,
    UnknownNormError,
    suggest,
)

ENTRY_POINT_GROUP = "normzoo"
BUILTIN_DISTRIBUTION = "normzoo"
STRICT_ENV = "NORMZOO_STRICT_PLUGINS"
BUILTIN_ONLY_ENV = "NORMZOO_BUILTIN_ONLY"


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed to load or declared invalid norms."""


class PluginLoadError(NormzooError):
    """A plugin failed to load while strict mode (``NORMZOO_STRICT_PLUGINS=1``) is on."""


@dataclass
class PluginRecord:
    """What the registry knows of one plugin: where it came from, its norms, its error."""

    name: str
    distribution: str = ""
    version: str = ""
    norms: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def builtin(self) -> bool:
        """True for the plugins bundled with normzoo itself."""
        return self.distribution == BUILTIN_DISTRIBUTION


class _InlinePlugin:
    """Wraps :class:`NormInfo` objects given to :meth:`Registry.register` as a plugin."""

    def __init__(self, norms: tuple[NormInfo, ...]) -> None:
        self.norms = norms

    @hookspecs.hookimpl
    def normzoo_register_norms(self, register: Callable[[NormInfo], None]) -> None:
        for norm in self.norms:
            register(norm)


@dataclass
class Registration:
    """Handle returned by :meth:`Registry.register`; :meth:`undo` (or leaving a ``with``
    block) removes the plugin and its norms again."""

    registry: Registry
    plugin_name: str

    def undo(self) -> None:
        """Unregister the plugin; a second call does nothing."""
        self.registry.unregister(self.plugin_name)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


class Registry:
    """Norms by name, gathered from plugins through one :class:`pluggy.PluginManager`.

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
        self._plugins: dict[str, PluginRecord] = {}
        self._needs_entry_points = entry_points
        self._inline_count = 0

    # -- loading -----------------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._needs_entry_points:
            self._needs_entry_points = False
            self.load_entry_points()

    def load_entry_points(self) -> None:
        """Load every plugin of the ``normzoo`` entry-point group, each in isolation.

        Raises :class:`PluginLoadError` on the first failure only in strict mode.
        """
        builtin_only = os.environ.get(BUILTIN_ONLY_ENV, "") not in ("", "0")
        for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=_load_order):
            distribution = _distribution_name(entry_point)
            if builtin_only and distribution != BUILTIN_DISTRIBUTION:
                continue
            if entry_point.name in self._plugins:
                continue  # the same distribution seen twice on sys.path
            record = PluginRecord(
                name=entry_point.name,
                distribution=distribution,
                version=entry_point.dist.version if entry_point.dist else "",
            )
            try:
                plugin = entry_point.load()
            except Exception as error:  # a broken plugin must not take the others down
                self._fail(record, f"import of {entry_point.value!r} failed: {_describe(error)}")
                continue
            self._add_plugin(plugin, record, isolate=True)

    def _fail(self, record: PluginRecord, message: str) -> None:
        record.error = message
        self._plugins[record.name] = record
        text = f"normzoo plugin {record.name!r} skipped: {message}"
        if os.environ.get(STRICT_ENV, "") not in ("", "0"):
            raise PluginLoadError(text)
        warnings.warn(text, PluginWarning, stacklevel=3)

    def _add_plugin(self, plugin: Any, record: PluginRecord, isolate: bool) -> None:
        """Register ``plugin`` with pluggy, collect its norms, and commit them all or none."""
        collected: list[NormInfo] = []
        try:
            self._manager.register(plugin, name=record.name)
        except Exception as error:
            if not isolate:
                raise
            self._fail(record, _describe(error))
            return
        try:
            hook = self._manager.hook.normzoo_register_norms
            for implementation in hook.get_hookimpls():
                if implementation.plugin is plugin:
                    implementation.function(register=collected.append)
            names: set[str] = set()
            for norm in collected:
                if not isinstance(norm, NormInfo):
                    raise NormzooError(f"register() expects a NormInfo, got {norm!r}")
                norm.validate()
                self._check_unique(norm.name, record.name, names)
                names.add(norm.name)
        except Exception as error:
            self._manager.unregister(name=record.name)
            if not isolate:
                raise
            self._fail(record, _describe(error))
            return
        for norm in collected:
            self._norms[norm.name] = replace(norm, plugin=record.name)
            record.norms.append(norm.name)
        self._plugins[record.name] = record

    def _check_unique(self, name: str, plugin: str, same_plugin: set[str]) -> None:
        if name in same_plugin:
            raise DuplicateNormError(f"plugin {plugin!r} registers norm {name!r} twice")
        if name in self._norms:
            owner = self._norms[name].plugin
            raise DuplicateNormError(
                f"norm {name!r} is registered by both plugin {owner!r} and plugin {plugin!r}; "
                "uninstall one of them or rename the norm"
            )

    # -- in-process registration ---------------------------------------------------------------

    def register(self, *items: NormInfo | object, name: str | None = None) -> Registration:
        """Register norms or a plugin object in this process, e.g. from a notebook or a test.

        Parameters
        ----------
        items:
            Either :class:`NormInfo` objects, or one plugin object (a module or instance with a
            ``normzoo_register_norms`` hook implementation).
        name:
            Plugin name shown by ``normzoo plugins``; generated when omitted.

        Returns
        -------
        Registration
            Call ``.undo()`` or use it as a context manager to remove the norms again.

        Errors (invalid declaration, duplicate name) are raised here, not isolated.
        """
        self._ensure_loaded()
        if items and all(isinstance(item, NormInfo) for item in items):
            plugin: object = _InlinePlugin(tuple(items))  # type: ignore[arg-type]
        elif len(items) == 1:
            plugin = items[0]
        else:
            raise NormzooError("register() takes NormInfo objects or exactly one plugin object")
        if name is None:
            self._inline_count += 1
            name = f"inline-{self._inline_count}"
        if name in self._plugins:
            raise DuplicateNormError(f"a plugin named {name!r} is already registered")
        self._add_plugin(plugin, PluginRecord(name=name), isolate=False)
        return Registration(self, name)

    def unregister(self, plugin_name: str) -> None:
        """Remove plugin ``plugin_name`` and its norms; unknown names are ignored."""
        record = self._plugins.pop(plugin_name, None)
        if record is None:
            return
        for norm in record.norms:
            self._norms.pop(norm, None)
        if self._manager.has_plugin(plugin_name):
            self._manager.unregister(name=plugin_name)

    # -- lookup --------------------------------------------------------------------------------

    def available(self) -> list[NormInfo]:
        """Every registered norm, sorted by name."""
        self._ensure_loaded()
        return [self._norms[name] for name in sorted(self._norms)]

    def info(self, name: str) -> NormInfo:
        """The :class:`NormInfo` of ``name``; :class:`UnknownNormError` lists valid names."""
        self._ensure_loaded()
        try:
            return self._norms[name]
        except KeyError:
            raise UnknownNormError(suggest("norm", str(name), self._norms)) from None

    def build(
        self, name: str, num_features: int, layout: str = "conv", **options: Any
    ) -> nn.Module:
        """Build norm ``name`` for ``num_features`` channels in ``layout`` with ``options``.

        Options may be typed values or strings (as from the command line); both are converted
        by the declared option types. Raises :class:`UnknownNormError`, :class:`LayoutError` or
        :class:`~normzoo.interface.OptionError` with a one-line message.
        """
        norm = self.info(name)
        if layout not in ("fc", "conv"):
            raise LayoutError(suggest("layout", str(layout), ("fc", "conv")))
        norm.check_layout(layout)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise NormzooError(f"num_features must be a positive int, got {num_features!r}")
        return norm.factory(num_features, layout, **norm.resolve_options(options))

    def plugins(self) -> list[PluginRecord]:
        """Every plugin seen, loaded or failed, sorted by name."""
        self._ensure_loaded()
        return [self._plugins[name] for name in sorted(self._plugins)]


def _distribution_name(entry_point: metadata.EntryPoint) -> str:
    return entry_point.dist.name if entry_point.dist else ""


def _load_order(entry_point: metadata.EntryPoint) -> tuple[bool, str, str]:
    """Bundled plugins first, so a third party cannot take a bundled norm's name."""
    distribution = _distribution_name(entry_point)
    return (distribution != BUILTIN_DISTRIBUTION, distribution, entry_point.name)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
