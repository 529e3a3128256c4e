"""normzoo: a plugin registry of normalization layers for PyTorch, and a harness to compare them.

The public API works on one process-wide :class:`~normzoo.registry.Registry`, created and
filled from the ``normzoo`` entry points on first use::

    import normzoo
    [norm.name for norm in normzoo.available()]
    layer = normzoo.build("batchnorm", 16, layout="conv", momentum=0.1)
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata
from typing import Any

from torch import nn

from normzoo.base import NormBase
from normzoo.errors import (
    BatchSizeError,
    DeclarationError,
    DuplicateNormError,
    LayoutError,
    NormBuildError,
    NormzooError,
    OptionError,
    UnknownNormError,
)
from normzoo.hookspecs import hookimpl
from normzoo.interface import AFFINE, EPS, MOMENTUM, SYNC, NormInfo, Option
from normzoo.layouts import LAYOUTS, Layout, get_layout
from normzoo.registry import PluginLoadError, PluginRecord, PluginWarning, Registration, Registry

try:
    __version__ = metadata.version("normzoo")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"


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


def register(*items: NormInfo | object, name: str | None = None) -> Registration:
    """Register norms (or a plugin object) in this process; ``.undo()`` removes them again."""
    return default_registry().register(*items, name=name)


def plugins() -> list[PluginRecord]:
    """Every plugin seen, with its distribution, version, norms and load error."""
    return default_registry().plugins()


from normzoo.convert import ConvertError, ConvertWarning, convert  # noqa: E402

__all__ = [
    "AFFINE",
    "ConvertError",
    "ConvertWarning",
    "EPS",
    "LAYOUTS",
    "MOMENTUM",
    "SYNC",
    "BatchSizeError",
    "DeclarationError",
    "DuplicateNormError",
    "Layout",
    "LayoutError",
    "NormBase",
    "NormBuildError",
    "NormInfo",
    "NormzooError",
    "Option",
    "OptionError",
    "PluginLoadError",
    "PluginRecord",
    "PluginWarning",
    "Registration",
    "Registry",
    "UnknownNormError",
    "__version__",
    "available",
    "build",
    "convert",
    "default_registry",
    "get_layout",
    "hookimpl",
    "info",
    "plugins",
    "register",
]
