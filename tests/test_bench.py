"""`normzoo bench`: what it measures and writes (a smoke test with --quick: no timing is
asserted, these machines are shared)."""

from __future__ import annotations

import json

import pytest
import torch

import normzoo
from normzoo.bench import (
    BASELINE,
    CASES,
    LAYERS,
    BenchConfig,
    end_to_end,
    format_table,
    run_bench,
    saved_bytes,
)
from normzoo.cli import main


def test_each_case_is_timed_against_the_baseline_in_the_same_rounds():
    config = BenchConfig(
        norms=("batchnorm", "pit"), cases=("lenet-train", "lenet-eval"), batch_size=32,
        threads=1, quick=True,
    )  # fmt: skip
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
    assert all(m.saved_bytes > 0 for m in results if m.case == "lenet-train")
    assert all(m.saved_bytes is None for m in results if m.case == "lenet-eval")


def test_layer_cases_cover_lenets_four_norm_shapes_and_count_saved_bytes():
    config = BenchConfig(norms=("batchnorm",), cases=CASES[2:], batch_size=16, quick=True)
    results = {m.case: m for m in run_bench(config)}
    assert set(results) == {f"{layer}-{mode}" for layer in LAYERS for mode in ("train", "eval")}
    # the from-scratch batch norm keeps what torch keeps for its backward: the input
    conv1 = results["conv1-train"]
    assert conv1.saved_bytes == pytest.approx(conv1.baseline_saved_bytes, rel=0.05)
    assert conv1.saved_bytes >= 16 * 6 * 24 * 24 * 4


def test_saved_bytes_counts_each_saved_tensor_once():
    x = torch.randn(1000, requires_grad=True)
    assert saved_bytes(lambda: (x * x).sum().backward()) == 4000  # x saved twice, one storage


def test_end_to_end_times_the_harness_and_the_textbook_pipeline():
    pipeline = end_to_end(BenchConfig(batch_size=64, threads=1), examples=256, rounds=1)
    assert pipeline.examples == 256
    assert pipeline.harness_examples_per_sec > 0 and pipeline.textbook_examples_per_sec > 0


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
