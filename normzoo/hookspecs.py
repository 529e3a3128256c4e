"""The pluggy hooks a normzoo plugin implements: one for norms, one for workloads.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl`, published
under the entry-point group ``normzoo``; it implements either hook or both::

    [project.entry-points.normzoo]
    my_norms = "my_package.my_norms"
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from normzoo.interface import NormInfo, WorkloadInfo

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


@hookspec
def normzoo_register_workloads(register: Callable[[WorkloadInfo], None]) -> None:
    """Register the workloads (a model with norm slots, and its data) this plugin provides.

    Call ``register(WorkloadInfo(...))`` once per workload; validated and isolated like norms.
    """


#: The hooks, by the kind of thing each registers.
HOOKS = {"norm": "normzoo_register_norms", "workload": "normzoo_register_workloads"}
