"""``normzoo run``: train a workload with a norm. Its options are :class:`RunConfig`'s fields,
each one's default, help, bounds and choices taken from the field."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from normzoo.cli.parsing import HelpFormatter
from normzoo.errors import NormzooError
from normzoo.harness.config import MAX_SEED, WORKLOAD_SETTINGS, RunConfig, check_bounds
from normzoo.workloads.slots import NO_SLOT


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``run`` to the ``normzoo`` parser's commands."""
    run = commands.add_parser(
        "run",
        help="train a workload (default: LeNet on Fashion-MNIST) with a norm and save the results",
        description="Train a workload's model (the default: the book's LeNet on Fashion-MNIST) "
        "with the chosen norm in its slots. Writes config.json, metrics.json (after every "
        "epoch), model.pt and curves.png to a new directory under --runs-dir. Defaults are the "
        "textbook's: lr 1.0, 10 epochs, batch 256, sigmoid; a workload may declare its own "
        "for the options marked so (`normzoo workloads` lists them), and an option given here "
        "wins over both.",
        formatter_class=HelpFormatter,
    )
    _add_config_options(run)
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.set_defaults(handler=_run)


#: How the help marks the options a workload may set a default for.
WORKLOAD_DEFAULT = "or the workload's own where it declares one"


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`RunConfig` field, its default, help, bounds and choices taken
    from the field: the command line restates none of them."""
    parser.add_argument(
        "--norm-opt", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
        dest="norm_options",
        help="norm option, repeatable; converted by its declared type (see `normzoo info NAME`)",
    )  # fmt: skip
    defaults = RunConfig()
    for spec in fields(RunConfig):
        if spec.name == "norm_options":
            continue
        flag = "--" + spec.name.replace("_", "-")
        default, metadata = getattr(defaults, spec.name), spec.metadata
        # left out of the namespace unless given, so that the workload's default can apply
        workload_may_set = spec.name in WORKLOAD_SETTINGS
        default_given = argparse.SUPPRESS if workload_may_set else default
        if isinstance(default, bool):
            if default:
                flag = "--no-" + spec.name.replace("_", "-")
            action = "store_false" if default else "store_true"
            help_text = metadata.get("flag", metadata.get("help"))
            if workload_may_set:
                help_text += " (unless the workload declares a default for it)"
            parser.add_argument(flag, dest=spec.name, action=action, help=help_text,
                                default=default_given)  # fmt: skip
            continue
        kind = metadata.get("type", type(default))
        help_text = metadata.get("help")
        if workload_may_set:
            help_text += f" (default: {default}, {WORKLOAD_DEFAULT})"
        parser.add_argument(
            flag, default=default_given, help=help_text, metavar=metadata.get("metavar"),
            type=_bounded_int(spec.name, metadata) if kind is int else kind,
            choices=metadata.get("choices"),
        )  # fmt: skip
    parser.add_argument(
        "--precise-stats", type=_bounded_int("precise_stats", {"minimum": 0}), metavar="N",
        help="the older spelling of --precise-examples, in batches: N * --batch-size examples",
    )  # fmt: skip


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _bounded_int(name: str, metadata: Mapping[str, Any]) -> Callable[[str], int]:
    """An argparse type: an integer within the bounds of a :class:`RunConfig` field."""
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if high == MAX_SEED:
        wanted = f"an integer from {low} to 2**63 - 1 ({MAX_SEED})"
    elif low == 1:
        wanted = "a positive integer"
    else:
        wanted = f"an integer >= {low}" if low is not None else "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
            check_bounds(name, value, metadata)
        except (ValueError, NormzooError):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        return value

    return parse


def _run(args: argparse.Namespace) -> int:
    from normzoo.harness.launch import launch
    from normzoo.harness.train import EpochMetrics, accuracy_label

    settings = {spec.name: getattr(args, spec.name) for spec in fields(RunConfig)
                if hasattr(args, spec.name)}  # fmt: skip
    if args.precise_stats is not None and "precise_examples" in settings:
        raise NormzooError("give --precise-examples or --precise-stats, not both")
    given = [key for key, _ in args.norm_options]
    repeated = sorted({key for key in given if given.count(key) > 1})
    if repeated:
        raise NormzooError(
            f"--norm-opt {repeated[0]} is given {given.count(repeated[0])} times; give each "
            "option once"
        )
    settings["norm_options"] = dict(args.norm_options)
    config = RunConfig.for_workload(**settings, precise_stats=args.precise_stats)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports
    given_norm = args.norm != RunConfig.norm or args.norm_options
    if config.placement == NO_SLOT and given_norm and main_process:
        warnings.warn(
            f"--placement none puts no norm in {args.workload}: --norm {args.norm} and its "
            "options are checked but not used (the run directory and config.json still name "
            "them)",
            stacklevel=1,
        )

    def report(metrics: EpochMetrics) -> None:
        if main_process:
            print(metrics.summary(config.evaluated_on), flush=True)

    from normzoo.harness.runs import RunFilesError

    try:
        result = launch(config, progress=args.progress, on_epoch=report)
    except RunFilesError as error:
        if error.directory is None:  # before the run existed: bad input, exit 2 (main)
            raise
        # after: the run itself failed (a full disk), like a failed run, not bad input
        print(f"normzoo: error: {error}; run directory {error.directory}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        # only around the run: once it has returned, its files say finished
        directory = getattr(error, "directory", None)
        where = f"; finished epochs are saved in {directory}" if directory else ""
        print(f"\nnormzoo: {error or 'interrupted'}{where}", file=sys.stderr)
        number = getattr(error, "signal_number", signal.SIGINT)  # bare: Python's own handler
        return 1 if number is None else 128 + number  # None: raised by code, not a signal
    if result.directory is None:  # not rank 0 under torchrun: rank 0 reports
        return 0 if result.status == "finished" else 1
    if result.status == "diverged":
        print(f"normzoo: {result.message}", file=sys.stderr)
        saved = "finished epochs saved in" if result.epochs else "no epoch finished; run directory"
        print(f"{saved} {result.directory.path}", file=sys.stderr)
        return 1
    last = result.epochs[-1]
    speed = sum(m.examples_per_sec for m in result.epochs) / len(result.epochs)
    print(
        f"done: norm {config.norm}, {accuracy_label(config.evaluated_on)} {last.test_acc:.3f}, "
        f"train loss {last.train_loss:.3f}, {speed:,.0f} examples/s on average\nresults: "
        f"{result.directory.path}"
    )
    if result.warning:
        print(f"warning: {result.warning}", flush=True)
    return 0
