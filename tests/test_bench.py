"""`normzoo bench`: what it measures and writes (a smoke test with --quick: no timing is
asserted, these machines are shared)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import normzoo
from normzoo.bench import BenchConfig, end_to_end, format_table, run_bench, to_json
from normzoo.bench import page as bench_page
from normzoo.bench.timing import BASELINE, saved_bytes, workload_cases
from normzoo.cli import main

#: lenet's cases, in order: docs/performance.md and its stored measurement are rendered from
#: these names, so they may not change.
LENET_CASES = (
    "lenet-train", "lenet-eval", "conv1-train", "conv1-eval", "conv2-train", "conv2-eval",
    "fc1-train", "fc1-eval", "fc2-train", "fc2-eval",
)  # fmt: skip


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


def test_lenets_cases_are_the_model_then_its_four_slots_in_order():
    assert workload_cases("lenet") == LENET_CASES
    assert BenchConfig().selected_cases() == LENET_CASES  # the default: lenet, every case
    slots = [slot.name for slot in normzoo.workload("lenet").slots]
    assert [case.rpartition("-")[0] for case in LENET_CASES[2::2]] == slots


def test_layer_cases_cover_lenets_four_norm_shapes_and_count_saved_bytes():
    config = BenchConfig(norms=("batchnorm",), cases=LENET_CASES[2:], batch_size=16, quick=True)
    results = {m.case: m for m in run_bench(config)}
    assert tuple(results) == LENET_CASES[2:]
    # the from-scratch batch norm keeps what torch keeps for its backward: the input
    conv1 = results["conv1-train"]
    assert conv1.saved_bytes == pytest.approx(conv1.baseline_saved_bytes, rel=0.05)
    assert conv1.saved_bytes >= 16 * 6 * 24 * 24 * 4


def test_another_workload_measures_its_model_and_its_slots(tmp_path, capsys):
    path = tmp_path / "mlp.json"
    command = ["bench", "--workload", "mlp", "--quick", "--norms", "batchnorm",
               "--cases", "mlp-train,fc1-eval", "--batch-size", "16", "--threads", "1",
               "--json", str(path)]  # fmt: skip
    assert main(command) == 0
    assert "workload mlp," in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["config"]["workload"] == "mlp"
    assert [(r["norm"], r["case"]) for r in saved["results"]] == [
        ("batchnorm", "mlp-train"), ("batchnorm", "fc1-eval"),
    ]  # fmt: skip
    assert all(r["ratio"] > 0 for r in saved["results"])
    assert saved["results"][0]["saved_bytes"] > 0  # the MLP's step, autograd's saved tensors
    slots = [f"fc{i}-{mode}" for i in range(1, 5) for mode in ("train", "eval")]
    assert workload_cases("mlp") == ("mlp-train", "mlp-eval", *slots)


def test_a_lenet_results_file_reads_as_before_workloads_existed():
    config = BenchConfig(norms=("batchnorm",), quick=True)
    settings = to_json([], config)["config"]
    assert "workload" not in settings and settings["cases"] == list(LENET_CASES)
    assert list(settings) == [
        "norms", "cases", "batch_size", "threads", "device", "rounds", "min_run_time", "quick",
        "epochs", "compile",
    ]  # fmt: skip
    assert to_json([], BenchConfig(workload="mlp"))["config"]["workload"] == "mlp"


def test_an_unknown_case_is_one_line_naming_the_workloads_cases(capsys):
    assert main(["bench", "--workload", "mlp", "--cases", "conv1-train", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "workload 'mlp': unknown case 'conv1-train'; valid cases: " in err
    for case in workload_cases("mlp"):
        assert case in err
    assert "lenet" not in err and "conv2" not in err
    with pytest.raises(normzoo.NormzooError, match="unknown workload 'lenett'"):
        run_bench(BenchConfig(workload="lenett"))


def test_saved_bytes_counts_each_saved_tensor_once():
    x = torch.randn(1000, requires_grad=True)
    assert saved_bytes(lambda: (x * x).sum().backward()) == 4000  # x saved twice, one storage


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("c++", "g++", "clang++")),
    reason="torch.compile on a CPU needs a C++ compiler",
)
def test_end_to_end_times_the_harness_compiled_or_not_and_the_textbook_pipeline():
    from torch._dynamo.utils import counters

    counters.clear()
    config = BenchConfig(batch_size=64, threads=1, epochs=2, compile=True)
    pipeline = end_to_end(config, examples=256, rounds=1)
    assert counters["stats"]["unique_graphs"] >= 1
    assert (pipeline.examples, pipeline.epochs) == (256, 2)
    assert pipeline.harness_examples_per_sec > 0 and pipeline.textbook_examples_per_sec > 0
    assert pipeline.compiled_examples_per_sec > 0
    plain = end_to_end(BenchConfig(batch_size=64, threads=1), examples=256, rounds=1)
    assert plain.compiled_examples_per_sec is None and plain.compiled_ratio is None


def test_epochs_and_compile_without_end_to_end_are_refused(capsys):
    assert main(["bench", "--compile", "--quick"]) == 2
    assert "--epochs and --compile apply to --end-to-end" in capsys.readouterr().err


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
    # what was run, not the default that --quick replaced
    assert saved["config"]["rounds"] == saved["results"][0]["rounds"] == 3


def test_a_case_a_norm_cannot_run_is_reported_as_skipped_with_the_reason(capsys):
    assert main(["bench", "--norms", "instancenorm", "--cases", "lenet-eval", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "lenet-eval   skipped: norm 'instancenorm' does not support layout 'fc'" in out


@pytest.mark.parametrize(
    "config, message",
    [
        (
            BenchConfig(cases=("lenet-trian",)),
            "workload 'lenet': unknown case 'lenet-trian'; valid cases: lenet-train",
        ),
        (BenchConfig(norms=("batchnrom",)), "unknown norm 'batchnrom'"),
        (BenchConfig(batch_size=1), "batch size must be >= 2"),
        (BenchConfig(epochs=0), "epochs must be >= 1, got 0"),
    ],
)
def test_bad_settings_are_one_line(config, message):
    with pytest.raises(normzoo.NormzooError, match=message):
        run_bench(config)


# -- the generated section of a page (docs/performance.md) -----------------------------------------


def stored(norms=("batchnorm", "pit"), end_to_end=True) -> dict:
    """A measurement as ``to_json`` lays it out, with round numbers."""
    results = []
    for i, norm in enumerate(norms):
        for case, ms in (("lenet-train", 30.0), ("lenet-eval", 8.0), ("fc1-train", 1.0)):
            ratio = 1.5 + i
            results.append({
                "norm": norm, "case": case, "seconds": ms * ratio / 1e3,
                "baseline_seconds": ms / 1e3, "ratio": ratio, "spread": 0.2 if i else 0.05,
                "rounds": 5, "saved_bytes": 3 * 2**20 if case.endswith("train") else None,
                "baseline_saved_bytes": 2**20 if case.endswith("train") else None,
                "peak_bytes": None,
            })  # fmt: skip
    return {
        "command": "normzoo bench --rounds 5", "machine": "a CPU, 2 cores", "torch": "2.x",
        "config": {"batch_size": 256, "threads": 2, "device": "cpu"}, "results": results,
        "end_to_end": {"norm": "batchnorm", "examples": 60000, "ratio": 2.0,
                       "harness_examples_per_sec": 9000.0, "textbook_examples_per_sec": 4500.0}
        if end_to_end else None,
    }  # fmt: skip


def test_the_section_is_rendered_from_the_stored_measurement_alone():
    text = bench_page.render(stored())
    assert "Measured by `normzoo bench --rounds 5` on a CPU, 2 cores, torch 2.x" in text
    assert "5 alternating rounds" in text
    assert "| `batchnorm` | 45.0 | 1.50 | 12.0 | 1.50 | 3.0 MiB (3.00) |" in text
    assert "| `pit` | 75.0 | 2.50 (noisy) | 20.0 | 2.50 (noisy) | 3.0 MiB (3.00) |" in text
    assert "| norm | fc1 train |" in text and "| `pit` | 2.50 (noisy) |" in text
    assert "| harness | 9,000 |" in text and "| ratio | **2.00** |" in text
    assert "End to end, `batchnorm`, one epoch of 60,000" in text
    assert "--compile" not in text
    assert "End to end" not in bench_page.render(stored(end_to_end=False))
    compiled = stored()
    compiled["end_to_end"] |= {"epochs": 3, "compiled_examples_per_sec": 13500.0,
                               "compiled_ratio": 3.0}  # fmt: skip
    text = bench_page.render(compiled)
    assert "End to end, `batchnorm`, 3 epochs of 60,000 training examples, each followed" in text
    assert "| harness, `--compile` (compile time included) | 13,500 |" in text
    assert "| ratio, `--compile` | **3.00** |" in text


def test_the_section_of_another_workload_names_it_and_its_slots_shapes(tmp_path):
    data = stored(end_to_end=False)
    data["config"]["workload"] = "mlp"
    for result in data["results"]:
        result["case"] = result["case"].replace("lenet", "mlp")
    text = bench_page.render(data)
    assert "`mlp`, the norm in all four slots:" in text and "LeNet" not in text
    assert "| `batchnorm` | 45.0 | 1.50 | 12.0 | 1.50 | 3.0 MiB (3.00) |" in text
    assert (
        "ratios at `mlp`'s shapes fc1 (B, 256), fc2 (B, 256), fc3 (B, 256), fc4 (B, 256):" in text
    )
    # a measurement of a workload not registered here is a problem of the page, not a crash
    data["config"]["workload"] = "gone"
    page = tmp_path / "gone.md"
    page.write_text(f"{bench_page.BEGIN}\n{bench_page.END}\n")
    bench_page.stored_path(page).write_text(json.dumps(data))
    (problem,) = bench_page.check([page])
    assert "bench section: unknown workload 'gone'" in problem


def test_bench_writes_the_page_section_and_compare_check_holds_it_to_the_stored_json(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(f"# Costs\n\nprose\n\n{bench_page.BEGIN}\n{bench_page.END}\n\nmore prose\n")
    command = ["bench", "--norms", "layernorm", "--cases", "lenet-train,fc2-eval",
               "--batch-size", "16", "--threads", "1", "--quick", "--page", str(page)]  # fmt: skip
    assert main(command) == 0
    data = json.loads(bench_page.stored_path(page).read_text())
    assert data["command"] == "normzoo " + " ".join(command)
    text = page.read_text()
    assert text.startswith("# Costs\n\nprose\n") and text.endswith("\n\nmore prose\n")
    assert bench_page.render(data) in text and "| `layernorm` |" in text
    assert main(["compare", "--check", str(tmp_path)]) == 0
    page.write_text(text.replace("| `layernorm` | ", "| `layernorm` | 9"))  # a hand edit
    problems = bench_page.check([tmp_path])
    assert len(problems) == 1 and "performance.md:" in problems[0] and "differs" in problems[0]
    assert main(["compare", "--check", str(page)]) == 1


def test_a_page_without_the_markers_is_refused_before_anything_is_measured(tmp_path, capsys):
    page = tmp_path / "plain.md"
    page.write_text("# no markers\n")
    assert main(["bench", "--norms", "layernorm", "--quick", "--page", str(page)]) == 2
    assert "needs the markers <!-- normzoo:bench:begin -->" in capsys.readouterr().err
    assert not bench_page.stored_path(page).exists()
    assert main(["bench", "--quick", "--page", str(tmp_path / "missing.md")]) == 2
    assert "cannot read the page" in capsys.readouterr().err
