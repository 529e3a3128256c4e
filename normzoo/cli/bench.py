"""``normzoo bench``: time norms against torch's batch norm and print (and optionally store)
the ratios. The timing itself is :mod:`normzoo.bench`."""

from __future__ import annotations

import argparse
import shlex

from normzoo.bench import BenchConfig
from normzoo.cli.parsing import HelpFormatter, positive_int
from normzoo.errors import NormzooError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``normzoo`` parser's commands."""
    bench = commands.add_parser(
        "bench",
        help="time norms against torch's batch norm, interleaved in one run",
        description="Time each norm against torch's batch norm in the same place (in a "
        "workload's model, LeNet by default: a training step and an eval forward; alone: one "
        "layer at each of the model's norm slots), in alternating rounds, and print the median "
        "ratio and the bytes saved for backward: speeds measured in separate runs on a shared "
        "machine are not comparable.",
        formatter_class=HelpFormatter,
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
        "--epochs", type=positive_int, default=BenchConfig.epochs,
        help="epochs each pipeline trains in --end-to-end",
    )  # fmt: skip
    bench.add_argument(
        "--compile", action="store_true",
        help="in --end-to-end, also time the harness with `normzoo run --compile` (compile "
        "time included: it pays off over several --epochs)",
    )  # fmt: skip
    bench.add_argument(
        "--batch-size", type=positive_int, default=BenchConfig.batch_size,
        help="examples per step",
    )  # fmt: skip
    bench.add_argument(
        "--threads", type=positive_int, default=BenchConfig.threads, help="torch threads, fixed"
    )
    bench.add_argument("--device", default=BenchConfig.device, help="cpu, cuda or cuda:N")
    bench.add_argument(
        "--rounds", type=positive_int, default=BenchConfig.rounds, help="alternating rounds"
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


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _bench(args: argparse.Namespace) -> int:
    from normzoo.bench import end_to_end, format_table, run_bench, to_json, write_json
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
