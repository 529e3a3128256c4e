"""`normzoo compare`: pages that are experiments, the run cache, statistics and --check."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from normzoo.cli import COMPARE_EPILOG, main
from normzoo.compare import CompareConfig, _plan, _seed_major, check, compare, parse_shard
from normzoo.compare.cache import resolved_config, run_key
from normzoo.compare.page import BEGIN, END, PageError, parse_page
from normzoo.compare.render import _interval
from normzoo.compare.summary import Interval
from normzoo.harness.config import RunConfig

from .pages import QUIET, two_arms, write_page

ROOT = Path(__file__).resolve().parent.parent
TWO_ARMS = two_arms(seeds=2)


def final_accuracies(results_dir: Path) -> dict[tuple[str, int], float]:
    """The final test accuracy of each stored run, by (variant label, seed)."""
    accuracies = {}
    for path in results_dir.glob("*.json"):
        result = json.loads(path.read_text())
        accuracies[result["label"], result["config"]["seed"]] = result["epochs"][-1]["test_acc"]
    return accuracies


def test_a_grid_times_a_variant_list_gives_labelled_variants(tmp_path):
    page = parse_page(write_page(tmp_path, """\
        seeds = [3, 5]
        baseline = "bn, lr=1.0"
        [base]
        epochs = 2
        [grid]
        lr = [0.1, 1.0]
        [[variant]]
        label = "bn"
        [[variant]]
        placement = "none"
        """))  # fmt: skip
    assert [v.label for v in page.variants] == [
        "bn, lr=0.1", "placement=none, lr=0.1", "bn, lr=1.0", "placement=none, lr=1.0",
    ]  # fmt: skip
    assert page.seeds == [3, 5]
    assert page.variants[1].config(5) == RunConfig(epochs=2, lr=0.1, placement="none", seed=5)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("sedes = 3\n", "unknown experiment key 'sedes'"),
        ("[base]\nlearning_rate = 1\n", "unknown setting 'learning_rate'"),
        ('baseline = "nope"\n', "unknown baseline 'nope'"),
        ("[grid]\nlr = 1.0\n", "[grid] lr must be a non-empty list"),
        ("seeds = 2.5\n", "seeds must be a count >= 1 or a list"),
        ('[[variant]]\nlabel = "a"\n[[variant]]\nlabel = "a"\n', "share the label 'a'"),
        ("baseline = 1\n", "baseline must be a string"),
        ('plots = "curves"\n', "plots must be a list"),
        ("variant = [1, 2]\n", "variant must be an array of tables"),
        ('[base]\nepochs = "one"\n', "epochs must be int, got 'one'"),
        ("[base]\nlr = true\n", "lr must be int or float, got True"),
        ("seeds = [true]\n", "seeds must be a count >= 1 or a list"),
        ("[[variant]]\nseeds = 0\n", "variant None: seeds must be a count >= 1 or a list"),
        (
            'seeds = 2\n[[variant]]\nlabel = "a"\n[[variant]]\nlabel = "b"\nseeds = [1, 7]\n',
            "variant 'b' has seeds [7] that its baseline 'a' does not run",
        ),
        ('[[variant]]\nlabel = "a"\nbaseline = "z"\n', "variant 'a': unknown baseline 'z'"),
        ('[[variant]]\nlabel = "a"\nbaseline = 2\n', "baseline must be a label, got 2"),
    ],
)
def test_a_bad_experiment_block_is_one_error_naming_the_page_and_line(tmp_path, block, message):
    with pytest.raises(PageError, match=r"page\.md:5: .*") as raised:
        parse_page(write_page(tmp_path, block))
    assert message in str(raised.value)


def test_a_toml_error_names_the_line_and_column_on_the_page(tmp_path):
    # tomllib counts from the block's first line; the page's fence is on line 5
    with pytest.raises(PageError, match=r"page\.md:7:12: the experiment block is not valid TOML"):
        parse_page(write_page(tmp_path, "seeds = 2\nbaseline = bn\n"))


def test_the_page_in_compare_help_is_a_valid_page_that_runs(tmp_path):
    indented = [line for line in COMPARE_EPILOG.splitlines() if line.startswith("  ")]
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("\n".join(indented)) + "\n")
    assert len(parse_page(page).variants) == 2
    assert compare([page], CompareConfig(smoke=True, progress=False)) == 0


def test_a_directory_with_a_file_that_is_not_utf8_is_searched_without_a_traceback(tmp_path):
    (tmp_path / "notes.md").write_bytes(b"# notes\n\xff\xfe latin-1 bytes\n")
    (tmp_path / "page.md").write_bytes(b"# page\n\xff\n```normzoo\nseeds = 1\n```\n")
    (problem,) = check([tmp_path])
    assert problem.startswith(f"{tmp_path / 'page.md'}: cannot be read as UTF-8 text")


def test_a_directory_without_pages_is_an_error_for_compare_as_for_check(tmp_path, capsys):
    for argv in (["compare", "--smoke", str(tmp_path)], ["compare", "--check", str(tmp_path)]):
        assert main(argv) != 0
        error = capsys.readouterr().err
        assert f"no page with a ```normzoo experiment block in {tmp_path}" in error


def test_a_page_without_markers_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```normzoo\nseeds = 1\n```\n")
    with pytest.raises(PageError, match="needs the markers"):
        parse_page(page)


def test_the_key_follows_what_a_run_computes_and_ignores_where_it_runs():
    base = run_key(resolved_config(RunConfig()))
    assert base == run_key(resolved_config(RunConfig(device="cpu", runs_dir="elsewhere")))
    assert base == run_key(resolved_config(RunConfig(norm_options={"eps": 1e-5})))  # a default
    assert base != run_key(resolved_config(RunConfig(norm_options={"eps": 1e-3})))
    assert base != run_key(resolved_config(RunConfig(seed=1)))
    assert base != run_key(resolved_config(RunConfig(freeze_affine=True)))
    bumped = resolved_config(RunConfig()) | {"norm_version": "999"}
    assert base != run_key(bumped)  # a norm whose math changed reruns


def test_intervals_agree_with_scipy():
    values = [0.861, 0.874, 0.869, 0.880, 0.858]
    interval = Interval.of(values)
    low, high = stats.t.interval(0.95, len(values) - 1, np.mean(values), stats.sem(values))
    assert math.isclose(interval.low, low) and math.isclose(interval.high, high)
    assert math.isclose(interval.std, np.std(values, ddof=1))
    assert Interval.of([0.5]).n == 1 and math.isnan(Interval.of([0.5]).low)


def test_a_paired_interval_that_crosses_zero_never_reads_as_touching_it():
    # A bound of -0.00006 rounds to zero; its sign must survive, or "[+0.000, +0.012]" would
    # read as a measurable gain when the interval crosses zero.
    crossing = Interval(mean=0.006, std=0.005, low=-0.00006, high=0.012, n=5)
    assert _interval(crossing, sign=True) == "[-0.000, +0.012]"
    touching = Interval(mean=0.006, std=0.005, low=0.00004, high=0.012, n=5)
    assert _interval(touching, sign=True) == "[+0.000, +0.012]"
    assert _interval(Interval(0.5, 0.1, -0.00001, 0.9, 5)) == "[0.000, 0.900]"


def test_compare_fills_the_section_and_check_catches_a_hand_edited_number(tmp_path):
    page = write_page(tmp_path, TWO_ARMS)
    before = page.read_text()
    assert compare([page], QUIET) == 0
    text = page.read_text()
    head, tail = before.split(BEGIN)[0], before.split(END)[1]
    assert text.startswith(head) and text.endswith(tail)  # nothing outside the markers moves
    section = text.split(BEGIN)[1].split(END)[0]
    assert "| with bias | 2 |" in section and "| without bias | 2 |" in section
    assert "baseline" in section and "page-curves.png" in section
    assert (tmp_path / "page-curves.png").stat().st_size > 1000
    assert len(list((tmp_path / "results").glob("*.json"))) == 4
    assert check([page]) == []

    row = next(line for line in text.splitlines() if line.startswith("| without bias"))
    number = row.split("|")[3].split()[0]  # final test accuracy, e.g. 0.512
    edited = text.replace(row, row.replace(number, f"{float(number) + 0.001:.3f}", 1))
    page.write_text(edited)
    (problem,) = check([page])
    line = edited.splitlines().index(row.replace(number, f"{float(number) + 0.001:.3f}", 1)) + 1
    assert problem.startswith(f"{page}:{line}: generated section differs")
    assert main(["compare", "--check", str(page)]) == 1


def test_text_edited_while_the_runs_go_on_is_kept(tmp_path, monkeypatch):
    page = write_page(tmp_path, TWO_ARMS)
    import normzoo.compare as compare_module

    real = compare_module.run_all

    def edit_then_run(*args, **kwargs):
        page.write_text(page.read_text().replace("The answer, by hand.", "Edited meanwhile."))
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "run_all", edit_then_run)
    compare([page], QUIET)
    assert "Edited meanwhile." in page.read_text() and check([page]) == []


def test_check_catches_what_no_run_could_use_and_files_that_are_not_results(tmp_path):
    page = write_page(tmp_path, '[base]\nplacement = "everywhere"\n')
    (problem,) = check([page])
    assert problem.startswith(f"{page}:5:") and "unknown placement 'everywhere'" in problem
    page = write_page(tmp_path, '[base]\nnorm = "groupnorm"\nnorm_options = {groups = 4}\n')
    (problem,) = check([page])
    assert "must divide num_features=6" in problem
    page = write_page(tmp_path, TWO_ARMS.replace("seeds = 2", "seeds = 1"))
    compare([page], QUIET)
    stored = sorted((tmp_path / "results").glob("*.json"))[0]
    stored.write_text("{}")
    (problem,) = check([page])
    assert f"{stored} is not a normzoo result" in problem and "delete it" in problem
    assert check([tmp_path / "results"]) == [
        f"no page with a ```normzoo experiment block in {tmp_path / 'results'}"
    ]


def test_check_reports_missing_runs_and_unknown_norms_without_training(tmp_path):
    page = write_page(tmp_path, TWO_ARMS)
    (problem,) = check([page])
    assert "4 of 4 runs are not stored" in problem
    other = write_page(tmp_path, '[base]\nnorm = "batchnrom"\n', "other.md")
    (problem,) = check([other])
    assert problem.startswith(f"{other}:5:") and "unknown norm 'batchnrom'" in problem
    assert not (tmp_path / "results").exists()


def test_a_second_compare_runs_nothing_and_a_new_seed_runs_only_itself(tmp_path, capsys):
    page = write_page(tmp_path, TWO_ARMS)
    compare([page], QUIET)
    stored = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*.json")}
    compare([page], QUIET)
    assert "4 runs: 4 stored, 0 to run" in capsys.readouterr().out
    page.write_text(page.read_text().replace("seeds = 2", "seeds = 3"))
    compare([page], QUIET)
    assert "6 runs: 4 stored, 2 to run" in capsys.readouterr().out
    for name, mtime in stored.items():
        assert (tmp_path / "results" / name).stat().st_mtime_ns == mtime


def test_a_variant_with_its_own_seeds_runs_and_pairs_only_those(tmp_path, capsys):
    page = write_page(
        tmp_path,
        TWO_ARMS.replace("bias_before_norm = false", "bias_before_norm = false\nseeds = [1]"),
    )
    assert parse_page(page).variants[1].seeds == [1]
    assert compare([page], QUIET) == 0
    assert "3 runs: 0 stored, 3 to run" in capsys.readouterr().out
    text = page.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| without bias |"))
    assert row.split("|")[2].strip() == "1"
    results = final_accuracies(tmp_path / "results")
    paired = results["without bias", 1] - results["with bias", 1]  # seed 1 with seed 1 only
    assert row.split("|")[-4].strip() == f"{round(paired, 3) + 0.0:+.3f} n/a"
    assert [cell.strip() for cell in row.split("|")[-3:-1]] == ["n/a", "n/a"]  # not tested
    assert "seeds 0, 1; their own seeds: without bias 1;" in text
    assert check([page]) == []


def test_a_variant_can_name_its_own_baseline(tmp_path):
    block = TWO_ARMS + textwrap.dedent("""
        [[variant]]
        label = "lr 0.5"
        lr = 0.5

        [[variant]]
        label = "without bias, lr 0.5"
        bias_before_norm = false
        lr = 0.5
        baseline = "lr 0.5"
        """)  # fmt: skip
    page = write_page(tmp_path, block)
    assert compare([page], QUIET) == 0
    results = final_accuracies(tmp_path / "results")
    text = page.read_text()
    assert "| paired difference (95%) to with bias, or as named |" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    paired = [results["without bias, lr 0.5", s] - results["lr 0.5", s] for s in (0, 1)]
    cell = rows["without bias, lr 0.5"].split("|")[-4].strip()
    assert cell.startswith(f"{round(sum(paired) / 2, 3) + 0.0:+.3f} [")
    assert cell.endswith(" to lr 0.5")
    assert not rows["lr 0.5"].split("|")[-4].strip().endswith("to lr 0.5")  # the page's baseline
    assert "(or to the variant its cell names)" in text
    assert check([page]) == []


def test_runs_go_seed_by_seed_so_a_stopped_comparison_leaves_balanced_seeds(tmp_path):
    page = parse_page(write_page(tmp_path, TWO_ARMS.replace("seeds = 2", "seeds = 3")))
    order = [(run.label, run.config.seed) for run in _seed_major([_plan(page)])]
    assert order == [
        ("with bias", 0), ("without bias", 0), ("with bias", 1), ("without bias", 1),
        ("with bias", 2), ("without bias", 2),
    ]  # fmt: skip


def test_shards_split_the_runs_and_merge_by_file_name(tmp_path, capsys):
    page = write_page(tmp_path, TWO_ARMS)
    compare([page], CompareConfig(progress=False, shard=(1, 2)))
    assert "2 runs: 0 stored, 2 to run" in capsys.readouterr().out
    assert check([page])  # half the runs are missing: not rewritten yet
    compare([page], CompareConfig(progress=False, shard=(2, 2)))
    assert check([page]) == []
    with pytest.raises(Exception, match="need 1 <= i <= k"):
        parse_shard("3/2")


def test_killing_compare_part_way_loses_no_finished_run(tmp_path):
    """SIGTERM while the second of four runs trains; the rerun redoes only what was missing."""
    page = write_page(tmp_path, TWO_ARMS.replace("epochs = 1", "epochs = 3"))
    command = [sys.executable, "-m", "normzoo", "compare", str(page), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    results = tmp_path / "results"
    deadline = time.monotonic() + 120
    while not (results.exists() and any(results.glob("*.json"))):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    finished = {p.name: p.read_bytes() for p in results.glob("*.json")}
    assert 1 <= len(finished) < 4
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"4 runs: {len(finished)} stored, {4 - len(finished)} to run" in rerun.stdout
    for name, content in finished.items():
        assert (results / name).read_bytes() == content
    assert check([page]) == []


def test_two_jobs_store_the_same_numbers_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    compare([write_page(one, TWO_ARMS)], QUIET)
    compare([write_page(two, TWO_ARMS)], CompareConfig(jobs=2, threads=1, progress=False))
    for path in (one / "results").glob("*.json"):
        a, b = json.loads(path.read_text()), json.loads((two / "results" / path.name).read_text())
        assert [e["test_acc"] for e in a["epochs"]] == [e["test_acc"] for e in b["epochs"]]


def test_every_page_in_the_docs_runs_in_smoke_mode():
    pages = [ROOT / "docs", ROOT / "README.md"]
    assert compare(pages, CompareConfig(smoke=True, progress=False)) == 0


def test_the_committed_pages_are_in_step_with_their_stored_results(capsys):
    """What CI proves: `normzoo compare --check docs/ README.md` passes."""
    status = main(["compare", "--check", str(ROOT / "docs"), str(ROOT / "README.md")])
    assert status == 0, capsys.readouterr().err
