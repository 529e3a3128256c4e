"""The listing commands: ``normzoo list``, ``workloads``, ``info`` and ``plugins``, each a look
at the registry that prints what it finds."""

from __future__ import annotations

import argparse
import textwrap

import normzoo
from normzoo.harness.config import RunConfig


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``list``, ``workloads``, ``info`` and ``plugins`` to the ``normzoo`` parser's
    commands."""
    listing = commands.add_parser("list", help="list the registered norms")
    listing.add_argument(
        "--workloads", action="store_true", help="list the registered workloads instead"
    )
    listing.set_defaults(handler=_list)

    workloads = commands.add_parser(
        "workloads", help="list the registered workloads (models with norm slots, and data)"
    )
    workloads.set_defaults(handler=_workloads)

    info = commands.add_parser("info", help="show a norm's options, defaults and reference")
    info.add_argument("name", help="norm name")
    info.set_defaults(handler=_info)

    plugins = commands.add_parser("plugins", help="show loaded plugins, versions and load errors")
    plugins.add_argument(
        "-v", "--verbose", action="store_true",
        help="also print the full traceback of each plugin that failed to load",
    )  # fmt: skip
    plugins.set_defaults(handler=_plugins)


def _list(args: argparse.Namespace) -> int:
    if args.workloads:
        return _workloads(args)
    norms = normzoo.available()
    width = max(len(norm.name) for norm in norms)
    layouts = {norm.name: ",".join(norm.layouts) for norm in norms}
    column = max(len("layouts"), *(len(text) for text in layouts.values()))
    print(f"{'name':<{width}}  {'layouts':<{column}}  {'batch stats':<11}  summary")
    for norm in norms:
        batch = "yes" if norm.uses_batch_stats else "no"
        print(f"{norm.name:<{width}}  {layouts[norm.name]:<{column}}  {batch:<11}  {norm.summary}")
    return 0


def _workloads(args: argparse.Namespace) -> int:
    for workload in normzoo.available_workloads():
        default = " (default)" if workload.name == RunConfig.workload else ""
        print(f"{workload.name}{default}: {workload.summary}")
        print(f"  plugin:    {workload.plugin}, version {workload.version}")
        print(f"  reference: {workload.reference or '-'}")
        slots = ", ".join(f"{slot.name} ({slot.channels} {slot.layout})" for slot in workload.slots)
        print(f"  slots:     {slots}")
        declared = ", ".join(f"{key}={value}" for key, value in workload.defaults.items())
        print(f"  defaults:  {declared or 'none declared: the harness defaults'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    norm = normzoo.info(args.name)
    print(f"{norm.name}: {norm.summary}")
    print(f"  plugin:      {norm.plugin}")
    print(f"  version:     {norm.version}")
    print(f"  layouts:     {', '.join(norm.layouts)}")
    print(f"  batch stats: {'yes' if norm.uses_batch_stats else 'no'}")
    print(f"  reference:   {norm.reference or '-'}")
    print("  options:" + ("" if norm.options else " none"))
    for option in norm.options:
        print(f"    {option.describe()}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    hidden = False  # a traceback that --verbose would show
    for record in normzoo.plugins():
        origin = f"{record.distribution} {record.version}".strip() or "in-process"
        if record.disabled:
            state = "disabled by NORMZOO_DISABLE"
        elif record.failed:
            state = f"FAILED: {record.error}"
        else:
            declared = [("norms", record.norms), ("workloads", record.workloads)]
            state = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in declared if names)
        print(f"{record.name} ({origin}): {state}")
        if record.failed and record.traceback:
            if args.verbose:
                print(textwrap.indent(record.traceback.rstrip("\n"), "    "))
            hidden = hidden or not args.verbose
    if hidden:
        print("(`normzoo plugins --verbose` shows the tracebacks of the failed plugins)")
    return 0
