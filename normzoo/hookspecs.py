"""The pluggy hooks a normzoo plugin implements.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl`, published
under the entry-point group ``normzoo``::

    [project.entry-points.normzoo]
    my_norms = "my_package.my_norms"
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from normzoo.interface import NormInfo

PROJECT_NAME = "normzoo"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    """Register the norms this plugin provides.

    Call ``register(NormInfo(...))`` once per norm. The registry validates each declaration and
    attributes it to this plugin; an invalid one, or a name another plugin already took, is
    reported as this plugin's load error without affecting other plugins.
    """
