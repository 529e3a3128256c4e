"""``normzoo``: the command line. Argument parsing and printing only; the work happens in the
registry (:mod:`normzoo`) and the harness (:mod:`normzoo.harness`)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NoReturn

import normzoo
from normzoo.bench import BenchConfig
from normzoo.compare import SMOKE_EXAMPLES, CompareConfig
from normzoo.errors import NormzooError
from normzoo.harness.config import MAX_SEED, RunConfig, check_bounds
from normzoo.harness.covariance import (
    COVARIANCE_BATCH_SIZES,
    COVARIANCE_BATCHES,
    COVARIANCE_GROUP_SIZE,
)
from normzoo.workloads.slots import NO_SLOT

EPILOG = """examples:
  normzoo run --norm batchnorm                  the textbook run: LeNet, 10 epochs, lr 1.0
  normzoo run --norm zca --norm-opt group_size=8 --activation relu --lr 0.1
  normzoo list                                  registered norms
  normzoo workloads                             registered workloads (lenet, mlp, ...)
  normzoo run --workload mlp --norm zca         the MLP of the decorrelated-BN experiments
  normzoo info batchnorm                        options, defaults and reference of a norm
  normzoo plugins                               loaded plugins and their load errors
  normzoo run --norm zca --nproc 2              two processes, statistics over the whole batch
  normzoo bench --norms pit,batchnorm           cost as a ratio to torch's batch norm
  normzoo compare docs/exercises/ --jobs 2      run what the pages declare, write the results in
  normzoo compare --check docs/                 are the pages in step with the stored results?
"""


COMPARE_EPILOG = """a page, the smallest (any Markdown file; GitHub shows it as it is):

  ```normzoo
  seeds = 3                   # a count, or a list of seeds
  baseline = "batchnorm"      # the variant the others are paired with

  [[variant]]
  label = "batchnorm"
  norm = "batchnorm"

  [[variant]]
  label = "layer norm, lr 0.3"
  norm = "layernorm"
  lr = 0.3
  ```

  <!-- normzoo:results:begin -->
  <!-- normzoo:results:end -->

Every key (a [grid] of settings, [base] settings, a variant's own seeds or baseline, the results \
and figures directories, the plots) is described in docs/writing-a-plugin.md, section 8, and \
in the docstring of normzoo/compare/page.py. A variant's settings are `normzoo run`'s options, \
spelled with underscores (batch_size, precise_examples). \
--check trains nothing, so it takes no --jobs, --threads, --shard or --smoke."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other normzoo error.

    argparse prints the whole usage block before its message, which buries the one line that
    matters; the usage is one ``--help`` away, and the message says so.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"normzoo: error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where it tells something, and keeps indented blocks of a text as written.

    A flag's ``False``, a ``None`` that means "not given" and an empty list say nothing that the
    help text does not; an indented block (an example page, a command) must not be re-wrapped.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            textwrap.indent(block, indent) if block.startswith("  ") else
            textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                          subsequent_indent=indent)
            for block in text.split("\n\n")
        )  # fmt: skip


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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
        if isinstance(default, bool):
            if default:
                flag = "--no-" + spec.name.replace("_", "-")
            action = "store_false" if default else "store_true"
            help_text = metadata.get("flag", metadata.get("help"))
            parser.add_argument(flag, dest=spec.name, action=action, help=help_text)
            continue
        kind = metadata.get("type", type(default))
        parser.add_argument(
            flag, default=default, help=metadata.get("help"), metavar=metadata.get("metavar"),
            type=_bounded_int(spec.name, metadata) if kind is int else kind,
            choices=metadata.get("choices"),
        )  # fmt: skip
    parser.add_argument(
        "--precise-stats", type=_bounded_int("precise_stats", {"minimum": 0}), metavar="N",
        help="the older spelling of --precise-examples, in batches: N * --batch-size examples",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normzoo",
        description="Normalization layers as plugins, compared in one harness on registered "
        "workloads (the book's LeNet on Fashion-MNIST by default).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"normzoo {normzoo.__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = commands.add_parser(
        "run",
        help="train a workload (default: LeNet on Fashion-MNIST) with a norm and save the results",
        description="Train a workload's model (the default: the book's LeNet on Fashion-MNIST) "
        "with the chosen norm in its slots. Writes config.json, metrics.json (after every "
        "epoch), model.pt and curves.png to a new directory under --runs-dir. Defaults are the "
        "textbook's: lr 1.0, 10 epochs, batch 256, sigmoid.",
        formatter_class=_HelpFormatter,
    )
    _add_config_options(run)
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.set_defaults(handler=_run)

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

    bench = commands.add_parser(
        "bench",
        help="time norms against torch's batch norm, interleaved in one run",
        description="Time each norm against torch's batch norm in the same place (in a "
        "workload's model, LeNet by default: a training step and an eval forward; alone: one "
        "layer at each of the model's norm slots), in alternating rounds, and print the median "
        "ratio and the bytes saved for backward: speeds measured in separate runs on a shared "
        "machine are not comparable.",
        formatter_class=_HelpFormatter,
    )
    bench.add_argument(
        "--workload", default=BenchConfig.workload, metavar="NAME",
        help="registered workload (see `normzoo workloads`)",
    )  # fmt: skip
    bench.add_argument(
        "--norms", type=_names, default=None, metavar="A,B",
        help="norms to measure; default: every registered norm",
    )  # fmt: skip
    bench.add_argument(
        "--cases", type=_names, default=None, metavar="A,B",
        help="the cases depend on the workload; default all of its: WORKLOAD-train (forward, "
        "loss, backward, SGD step), WORKLOAD-eval, and SLOT-train/eval for each of its norm "
        "slots (one norm layer alone at that slot's shape), e.g. for lenet: lenet-train, "
        "lenet-eval, conv1/conv2/fc1/fc2-train/eval",
    )  # fmt: skip
    bench.add_argument(
        "--end-to-end", action="store_true",
        help="also time an epoch of the harness against the textbook DataLoader pipeline",
    )  # fmt: skip
    bench.add_argument(
        "--epochs", type=_positive_int, default=BenchConfig.epochs,
        help="epochs each pipeline trains in --end-to-end",
    )  # fmt: skip
    bench.add_argument(
        "--compile", action="store_true",
        help="in --end-to-end, also time the harness with `normzoo run --compile` (compile "
        "time included: it pays off over several --epochs)",
    )  # fmt: skip
    bench.add_argument(
        "--batch-size", type=_positive_int, default=BenchConfig.batch_size,
        help="examples per step",
    )  # fmt: skip
    bench.add_argument(
        "--threads", type=_positive_int, default=BenchConfig.threads, help="torch threads, fixed"
    )
    bench.add_argument("--device", default=BenchConfig.device, help="cpu, cuda or cuda:N")
    bench.add_argument(
        "--rounds", type=_positive_int, default=BenchConfig.rounds, help="alternating rounds"
    )
    bench.add_argument("--quick", action="store_true", help="3 short rounds: a smoke test")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument(
        "--page", metavar="PAGE.md",
        help="store the results as PAGE.bench.json and rewrite the page's section between "
        "<!-- normzoo:bench:begin --> and <!-- normzoo:bench:end --> from them (checked by "
        "normzoo compare --check)",
    )  # fmt: skip
    bench.set_defaults(handler=_bench)

    covariance = commands.add_parser(
        "covariance",
        help="measure the rank and conditioning of each norm layer's batch covariance",
        description="Load a finished run (its config.json and model.pt), pass batches of its "
        "training data through the trained model, and report for each norm layer and batch "
        "size the numerical rank of the covariance of the layer's input channels (at most the "
        "values per channel less one: the batch size in a fully connected layer) and the "
        "condition number of that covariance plus the layer's eps: what whitening all of a "
        "layer's channels at once inverts, next to the worst group of --group-size channels. "
        "Prints a table and writes covariance.json into the run directory.",
        formatter_class=_HelpFormatter,
    )
    covariance.add_argument("run_dir", metavar="RUN_DIR", help="a directory `normzoo run` wrote")
    covariance.add_argument(
        "--batch-size", type=_positive_int, nargs="+", default=list(COVARIANCE_BATCH_SIZES),
        metavar="N", help="batch sizes to measure at",
    )  # fmt: skip
    covariance.add_argument(
        "--batches", type=_positive_int, default=COVARIANCE_BATCHES,
        help="batches per batch size; the table shows the median over them",
    )  # fmt: skip
    covariance.add_argument(
        "--group-size", type=_positive_int, default=COVARIANCE_GROUP_SIZE,
        help="channels per group for the grouped condition number (zca's default)",
    )  # fmt: skip
    covariance.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    covariance.set_defaults(handler=_covariance)

    comparison = commands.add_parser(
        "compare",
        help="run the experiments declared in Markdown pages and write their results in",
        description="Each page declares an experiment in a ```normzoo block (TOML: base "
        "settings, a grid and/or a list of variants, seeds) and has a generated section between "
        "<!-- normzoo:results:begin --> and <!-- normzoo:results:end -->. Runs every "
        "(variant, seed) not stored yet, storing each the moment it finishes (an interrupted "
        "comparison resumes where it stopped), then rewrites the generated sections (a table "
        "with means, 95% intervals and paired differences to the baseline) and the plots. "
        "See docs/exercises/ for pages.",
        epilog=COMPARE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    comparison.add_argument("paths", nargs="+", metavar="PAGE", help="pages or directories")
    comparison.add_argument(
        "--check", action="store_true",
        help="train nothing: fail if a page's generated section or plots differ from what its "
        "stored results give, a run is missing, or a page names an unknown norm or option",
    )  # fmt: skip
    comparison.add_argument(
        "--jobs",
        type=_positive_int,
        default=CompareConfig.jobs,
        help="runs in parallel, in separate processes",
    )
    comparison.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch threads per process (default: the cores split between the jobs)",
    )  # fmt: skip
    comparison.add_argument(
        "--shard", default=None, metavar="I/K",
        help="run only slice I of K of the runs (e.g. one per CI matrix entry); results merge "
        "by file name",
    )  # fmt: skip
    comparison.add_argument(
        "--smoke", action="store_true",
        help=f"one seed, one epoch, {SMOKE_EXAMPLES} examples per variant; stores nothing and "
        "rewrites no page (a test that the pages run)",
    )  # fmt: skip
    comparison.add_argument(
        "--verify", type=_positive_int, default=None, metavar="K",
        help="train K stored runs of the pages again, drawn at random, each with its stored "
        "configuration and thread count, storing nothing; report each as exact (every "
        "epoch's train_loss, train_acc and test_acc bit-identical) or different (the first "
        "number that differs); exit status 1 if any differs. With --jobs 1 the reruns share "
        "this process: run it with OMP_NUM_THREADS set to the stored thread count",
    )  # fmt: skip
    comparison.add_argument(
        "--verify-run", action="append", default=[], metavar="KEY",
        help="also verify the stored run KEY (its result file's name), repeatable",
    )  # fmt: skip
    comparison.add_argument(
        "--verify-seed", type=int, default=None, metavar="S",
        help="draw the runs of --verify with seed S (printed by every --verify) to repeat a "
        "choice",
    )  # fmt: skip
    comparison.add_argument(
        "--prune", action="store_true",
        help="train nothing: delete the result files in the pages' results folders that none "
        "of the pages uses (old runs of withdrawn or retuned variants), naming each. Give "
        "every page that shares the folders: a result of a page left out counts as unused",
    )  # fmt: skip
    comparison.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    comparison.set_defaults(handler=_compare)
    parser.set_defaults(command_parsers=commands.choices)
    return parser


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _covariance(args: argparse.Namespace) -> int:
    import torch

    from normzoo.harness.covariance import measure, named_norms, table
    from normzoo.harness.experiment import restore
    from normzoo.harness.runs import atomic_write_json

    config, model, data = restore(args.run_dir, torch.device(args.device))
    norms = named_norms(model, config)
    spectra = measure(model, norms, data.train, args.batch_size, args.batches, args.group_size)
    print(f"{config.workload} + {config.norm} ({args.run_dir}), medians over {args.batches} "
          "batches of the training data:")  # fmt: skip
    print(table(spectra))
    path = Path(args.run_dir).expanduser() / "covariance.json"
    atomic_write_json(path, {"batches": args.batches, "spectra": [asdict(s) for s in spectra]})
    print(f"written to {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from normzoo.bench import (
        BenchConfig,
        end_to_end,
        format_table,
        run_bench,
        to_json,
        write_json,
    )
    from normzoo.bench import page as bench_page

    if args.page:
        bench_page.require_section(args.page)
    if not args.end_to_end and (args.compile or args.epochs != BenchConfig.epochs):
        raise NormzooError("--epochs and --compile apply to --end-to-end; add --end-to-end")
    config = BenchConfig(
        workload=args.workload, norms=args.norms or (), cases=args.cases or (),
        batch_size=args.batch_size, threads=args.threads, device=args.device,
        rounds=args.rounds, quick=args.quick, epochs=args.epochs, compile=args.compile,
    )  # fmt: skip

    def report(m) -> None:  # noqa: ANN001
        flag = "  (noisy: rerun on a quieter machine)" if m.noisy else ""
        print(f"{m.norm:>16} {m.case:<12} {m.ratio:5.2f}x  ({m.seconds * 1e3:.2f} ms){flag}")

    def skipped(norm: str, case: str, reason: str) -> None:
        print(f"{norm:>16} {case:<12} skipped: {reason}")

    results = run_bench(config, on_result=report, on_skip=skipped)
    print()
    print(format_table(results, config))
    pipeline = None
    if args.end_to_end:
        pipeline = end_to_end(config)
        print(
            f"\nend to end, {pipeline.norm}, {pipeline.epochs} epoch(s) of {pipeline.examples:,} "
            f"examples + test: harness {pipeline.harness_examples_per_sec:,.0f} examples/s, "
            f"textbook DataLoader pipeline {pipeline.textbook_examples_per_sec:,.0f}: "
            f"{pipeline.ratio:.2f}x"
        )
        if pipeline.compiled_ratio is not None:
            print(
                f"harness with --compile {pipeline.compiled_examples_per_sec:,.0f} examples/s: "
                f"{pipeline.compiled_ratio:.2f}x"
            )
    data = to_json(results, config, pipeline, shlex.join(["normzoo", *args.argv]))
    if args.json:
        write_json(args.json, data)
        print(f"results: {args.json}")
    if args.page:
        stored = bench_page.write(args.page, data)
        print(f"section of {args.page} rewritten from {stored}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from normzoo.compare import check, checked_pages, compare, counted, parse_shard

    if args.verify or args.verify_run:
        return _verify(args)
    if args.verify_seed is not None:
        raise NormzooError(f"--verify-seed {args.verify_seed} draws the runs of --verify K; "
                           "add --verify K")  # fmt: skip
    if args.prune:
        return _prune(args)
    if args.check:
        if args.jobs != CompareConfig.jobs or args.threads or args.shard is not None or args.smoke:
            raise NormzooError("--check trains nothing: it takes no --jobs, --threads, --shard "
                               "or --smoke")  # fmt: skip
        problems = check(args.paths)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(counted(len(problems), "problem"))
        else:
            pages = checked_pages(args.paths)
            their = "its" if pages == 1 else "their"
            print(f"{counted(pages, 'page')} in step with {their} results")
        return 1 if problems else 0
    config = CompareConfig(
        jobs=args.jobs,
        threads=args.threads,
        shard=parse_shard(args.shard) if args.shard is not None else None,
        smoke=args.smoke,
        progress=args.progress,
    )
    try:
        failures = compare(args.paths, config)
    except KeyboardInterrupt as error:
        from normzoo.harness.interrupts import raised_interruption_message, was_reported

        number = getattr(error, "signal_number", signal.SIGINT)  # bare: Python's own handler
        if not was_reported(error):  # stopped before (or between) the runs: compare said nothing
            said = str(error) or raised_interruption_message(error)
            print(f"normzoo: {'interrupted' if number is not None else said}", file=sys.stderr)
        return 1 if number is None else 128 + number  # None: raised by code, not a signal
    return 1 if failures else 0


def _prune(args: argparse.Namespace) -> int:
    from normzoo.compare import counted
    from normzoo.compare.prune import prune

    if args.check or args.jobs != CompareConfig.jobs or args.threads or args.shard is not None \
            or args.smoke:  # fmt: skip
        raise NormzooError("--prune trains nothing: it takes no --check, --jobs, --threads, "
                           "--shard or --smoke")  # fmt: skip
    deleted = prune(args.paths)
    print(f"{counted(len(deleted), 'unused result file')} deleted")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from normzoo.compare.verify import verify

    if args.check or args.threads or args.shard is not None or args.smoke:
        raise NormzooError("--verify reruns stored runs with their own thread counts and "
                           "stores nothing: it takes no --check, --threads, --shard or "
                           "--smoke")  # fmt: skip
    try:
        verdicts = verify(
            args.paths, args.verify or 0, args.verify_run, args.verify_seed, args.jobs
        )
    except KeyboardInterrupt as error:
        number = getattr(error, "signal_number", signal.SIGINT)  # bare: Python's own handler
        return 1 if number is None else 128 + number  # None: raised by code, not a signal
    return 0 if all(verdict.exact for verdict in verdicts) else 1


def _run(args: argparse.Namespace) -> int:
    from normzoo.harness.launch import launch
    from normzoo.harness.train import EpochMetrics, accuracy_label

    settings = {spec.name: getattr(args, spec.name) for spec in fields(RunConfig)}
    if args.precise_stats is not None:
        if args.precise_examples != RunConfig.precise_examples:
            raise NormzooError("give --precise-examples or --precise-stats, not both")
        del settings["precise_examples"]
    given = [key for key, _ in args.norm_options]
    repeated = sorted({key for key in given if given.count(key) > 1})
    if repeated:
        raise NormzooError(
            f"--norm-opt {repeated[0]} is given {given.count(repeated[0])} times; give each "
            "option once"
        )
    settings["norm_options"] = dict(args.norm_options)
    config = RunConfig(**settings, precise_stats=args.precise_stats)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports
    given_norm = args.norm != RunConfig.norm or args.norm_options
    if args.placement == NO_SLOT and given_norm and main_process:
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    where = f" ({filename}:{lineno})" if issubclass(category, normzoo.PluginWarning) else ""
    print(f"normzoo: warning: {message}{where}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normzoo`` console script; returns the exit status."""
    warnings.showwarning = _show_warning
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if unknown:  # reported by the command's parser, which names the command's --help
        args.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except NormzooError as error:
        print(f"normzoo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
