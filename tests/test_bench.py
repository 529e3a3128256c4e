"""`normzoo bench`: what it measures and writes (a smoke test with --quick: no timing is
asserted, these machines are shared)."""

from __future__ import annotations

import json

import pytest
import torch

import normzoo
from normzoo.bench import BASELINE, BenchConfig, format_table, run_bench
from normzoo.cli import main


def test_each_case_is_timed_against_the_baseline_in_the_same_rounds():
    config = BenchConfig(norms=("batchnorm", "pit"), batch_size=32, threads=1, quick=True)
    threads = torch.get_num_threads()
    results = run_bench(config)
    assert torch.get_num_threads() == threads  # restored
    assert [(m.norm, m.case) for m in results] == [
        ("batchnorm", "lenet-train"), ("batchnorm", "lenet-eval"),
        ("pit", "lenet-train"), ("pit", "lenet-eval"),
    ]  # fmt: skip
    for m in results:
        assert m.seconds > 0 and m.baseline_seconds > 0 and m.rounds == 3
        assert m.ratio > 0 and m.spread >= 0
    table = format_table(results, config)
    assert f"baseline {BASELINE}" in table and "| pit | lenet-train |" in table


def test_the_command_line_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    status = main(
        ["bench", "--norms", "layernorm", "--cases", "lenet-eval", "--batch-size", "16",
         "--threads", "1", "--quick", "--json", str(path)]
    )  # fmt: skip
    assert status == 0
    assert "| layernorm | lenet-eval |" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["config"]["threads"] == 1 and saved["results"][0]["norm"] == "layernorm"


@pytest.mark.parametrize(
    "config, message",
    [
        (
            BenchConfig(cases=("lenet-trian",)),
            "unknown case 'lenet-trian'; valid cases: lenet-train",
        ),
        (BenchConfig(norms=("batchnrom",)), "unknown norm 'batchnrom'"),
        (BenchConfig(batch_size=1), "batch size must be >= 2"),
    ],
)
def test_bad_settings_are_one_line(config, message):
    with pytest.raises(normzoo.NormzooError, match=message):
        run_bench(config)
