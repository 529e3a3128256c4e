"""``normzoo compare``: run the experiments that Markdown pages declare and write the results
in, or, with ``--check``, ``--verify`` or ``--prune``, check, rerun or tidy the stored ones.
The work is :mod:`normzoo.compare`."""

from __future__ import annotations

import argparse
import signal
import sys

from normzoo.cli.parsing import HelpFormatter, positive_int
from normzoo.compare import EXECUTORS, SMOKE_EXAMPLES, CompareConfig
from normzoo.errors import NormzooError

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
--check trains nothing, so it takes no --jobs, --threads, --shard, --smoke, --executor or \
--address."""


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``compare`` to the ``normzoo`` parser's commands."""
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
        formatter_class=HelpFormatter,
    )
    comparison.add_argument("paths", nargs="+", metavar="PAGE", help="pages or directories")
    comparison.add_argument(
        "--check", action="store_true",
        help="train nothing: fail if a page's generated section or plots differ from what its "
        "stored results give, a run is missing, or a page names an unknown norm or option",
    )  # fmt: skip
    comparison.add_argument(
        "--jobs",
        type=positive_int,
        default=CompareConfig.jobs,
        help="runs in parallel, in separate processes (with --executor ray: the size of the "
        "local Ray instance, --jobs x --threads CPUs; with --address the cluster's CPUs decide)",
    )
    comparison.add_argument(
        "--threads", type=positive_int, default=None,
        help="torch threads per process (default: the cores split between the jobs)",
    )  # fmt: skip
    comparison.add_argument(
        "--executor", choices=EXECUTORS, default=CompareConfig.executor,
        help="where the runs train: local processes (--jobs of them), or Ray tasks of --threads "
        "CPUs each (needs the ray extra: pip install -e \".[ray]\"); with no --address, on a "
        "local Ray instance of --jobs x --threads CPUs; results come back to this process, "
        "which alone stores them",
    )  # fmt: skip
    comparison.add_argument(
        "--address", default=None,
        help="with --executor ray: join the running Ray cluster there (auto, HOST:PORT, or "
        "ray://HOST:PORT for Ray Client, which needs pip install \"ray[client]\"), whose CPUs "
        "decide how many runs train at once; normzoo and the pages' plugins must be installed "
        "on its nodes (see docs/running-on-ray.md)",
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
        "--verify", type=positive_int, default=None, metavar="K",
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
        if (
            args.jobs != CompareConfig.jobs
            or args.threads
            or args.shard is not None
            or args.smoke
            or args.executor != CompareConfig.executor
            or args.address
        ):
            raise NormzooError("--check trains nothing: it takes no --jobs, --threads, --shard, "
                               "--smoke, --executor or --address")  # fmt: skip
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
        executor=args.executor,
        address=args.address,
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
