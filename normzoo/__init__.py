"""normzoo: a plugin registry of normalization layers for PyTorch, and a harness to compare them.

This module only re-exports: the public API (its functions work on one process-wide
:class:`~normzoo.registry.Registry`, created and filled from the ``normzoo`` entry points on
first use) and everything a plugin author needs, so that a plugin imports ``normzoo`` alone::

    import normzoo
    [norm.name for norm in normzoo.available()]
    layer = normzoo.build("batchnorm", 16, layout="conv", momentum=0.1)
"""

from __future__ import annotations

from importlib import metadata

from normzoo.base import AffineNorm, NormBase
from normzoo.convert import ConvertError, ConvertWarning, convert
from normzoo.errors import (
    BatchSizeError,
    DeclarationError,
    DuplicateNormError,
    LayoutError,
    NormBuildError,
    NormzooError,
    OptionError,
    UnknownNormError,
    UnknownWorkloadError,
)
from normzoo.hookspecs import hookimpl
from normzoo.interface import (
    AFFINE,
    EPS,
    MOMENTUM,
    SYNC,
    NormInfo,
    Option,
    Slot,
    WorkloadInfo,
    check_batch_size,
    check_input,
)
from normzoo.layouts import LAYOUTS, Layout, get_layout
from normzoo.registry import (
    PluginLoadError,
    PluginRecord,
    PluginWarning,
    Registration,
    Registry,
    available,
    available_workloads,
    build,
    default_registry,
    info,
    plugins,
    register,
    workload,
)

try:
    __version__ = metadata.version("normzoo")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "AFFINE",
    "EPS",
    "LAYOUTS",
    "MOMENTUM",
    "SYNC",
    "AffineNorm",
    "BatchSizeError",
    "ConvertError",
    "ConvertWarning",
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
    "Slot",
    "UnknownNormError",
    "UnknownWorkloadError",
    "WorkloadInfo",
    "__version__",
    "available",
    "available_workloads",
    "build",
    "check_batch_size",
    "check_input",
    "convert",
    "default_registry",
    "get_layout",
    "hookimpl",
    "info",
    "plugins",
    "register",
    "workload",
]
