"""``normzoo covariance``: the rank and conditioning of each norm layer's batch covariance in
a finished run. The measuring is :mod:`normzoo.harness.covariance`."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from normzoo.cli.parsing import HelpFormatter, positive_int
from normzoo.harness.covariance import (
    COVARIANCE_BATCH_SIZES,
    COVARIANCE_BATCHES,
    COVARIANCE_GROUP_SIZE,
)


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``covariance`` to the ``normzoo`` parser's commands."""
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
        formatter_class=HelpFormatter,
    )
    covariance.add_argument("run_dir", metavar="RUN_DIR", help="a directory `normzoo run` wrote")
    covariance.add_argument(
        "--batch-size", type=positive_int, nargs="+", default=list(COVARIANCE_BATCH_SIZES),
        metavar="N", help="batch sizes to measure at",
    )  # fmt: skip
    covariance.add_argument(
        "--batches", type=positive_int, default=COVARIANCE_BATCHES,
        help="batches per batch size; the table shows the median over them",
    )  # fmt: skip
    covariance.add_argument(
        "--group-size", type=positive_int, default=COVARIANCE_GROUP_SIZE,
        help="channels per group for the grouped condition number (zca's default)",
    )  # fmt: skip
    covariance.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    covariance.set_defaults(handler=_covariance)


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
