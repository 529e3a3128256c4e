"""A page's ``normzoo bench`` section: tables rendered from a stored measurement.

``normzoo bench --page PAGE.md`` stores its measurement as ``PAGE.bench.json`` beside the page
and rewrites the text between :data:`BEGIN` and :data:`END` (nothing else on the page). The
section is a function of the stored JSON (and of the measured workload's declared slots, whose
shapes head the one-layer table), so ``normzoo compare --check`` can prove the page in step with
its measurement without timing anything: timings are not reproducible, the rendering of a
stored one is.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path
from typing import Any

from normzoo import registry
from normzoo.bench.timing import DEFAULT_WORKLOAD, MODES, NOISY_SPREAD, baseline_of
from normzoo.errors import NormzooError
from normzoo.harness.runs import atomic_write_json
from normzoo.interface import Slot

BEGIN = "<!-- normzoo:bench:begin -->"
END = "<!-- normzoo:bench:end -->"
_MIB = 2**20
#: How the section names a workload in its prose; any other is named as registered, in code.
_TITLES = {"lenet": "LeNet"}
_COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def stored_path(page: Path | str) -> Path:
    """Where a page's measurement is stored: ``PAGE.bench.json`` beside ``PAGE.md``."""
    page = Path(page)
    return page.with_name(page.stem + ".bench.json")


def _ratio(result: dict[str, Any]) -> str:
    noisy = " (noisy)" if result["spread"] > NOISY_SPREAD else ""
    return f"{result['ratio']:.2f}{noisy}"


def _title(workload: str) -> str:
    return _TITLES.get(workload, f"`{workload}`")


def _model_table(
    results: dict[tuple[str, str], dict[str, Any]], norms: list[str], workload: str
) -> list[str]:
    """The whole model's train step and eval forward, a row per norm."""
    lines = [
        "| norm | train step (ms) | ratio | eval forward (ms) | ratio | saved for backward "
        "(ratio) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for norm in norms:
        train = results.get((norm, f"{workload}-train"))
        evaluation = results.get((norm, f"{workload}-eval"))
        if train is None and evaluation is None:
            continue
        cells = []
        for result in (train, evaluation):
            cells += ["-", "-"] if result is None else [
                f"{result['seconds'] * 1e3:.1f}", _ratio(result)
            ]  # fmt: skip
        saved = "-"
        if train is not None and train.get("saved_bytes") and train.get("baseline_saved_bytes"):
            ratio = train["saved_bytes"] / train["baseline_saved_bytes"]
            saved = f"{train['saved_bytes'] / _MIB:.1f} MiB ({ratio:.2f})"
        lines.append(f"| `{norm}` | " + " | ".join(cells) + f" | {saved} |")
    return lines


def _layer_table(
    results: dict[tuple[str, str], dict[str, Any]], norms: list[str], slots: tuple[Slot, ...]
) -> list[str]:
    """One norm layer alone at each slot, ratios only, a column per case in the slots' order."""
    cases = [f"{slot.name}-{mode}" for slot in slots for mode in MODES]
    cases = [case for case in cases if any((norm, case) in results for norm in norms)]
    if not cases:
        return []
    lines = [
        "| norm | " + " | ".join(case.replace("-", " ") for case in cases) + " |",
        "| --- |" + " ---: |" * len(cases),
    ]
    for norm in norms:
        row = [results.get((norm, case)) for case in cases]
        if all(result is None for result in row):
            continue
        cells = ["-" if result is None else _ratio(result) for result in row]
        lines.append(f"| `{norm}` | " + " | ".join(cells) + " |")
    return lines


def render(data: dict[str, Any]) -> str:
    """The section's Markdown for a stored measurement (``timing.to_json``'s layout).

    A measurement of a workload that is not registered here is :class:`NormzooError`.
    """
    config = data["config"]
    workload = config.get("workload", DEFAULT_WORKLOAD)
    slots = registry.workload(workload).slots
    results = {(r["norm"], r["case"]): r for r in data["results"]}
    norms = list(dict.fromkeys(r["norm"] for r in data["results"]))
    rounds = max((r["rounds"] for r in data["results"]), default=0)
    lines = [
        f"Measured by `{data['command']}` on {data['machine']}, torch {data['torch']}: batch "
        f"{config['batch_size']}, {config['threads']} thread(s), device {config['device']}, "
        f"{rounds} alternating rounds per case against `{baseline_of(workload)}` in the same "
        f"place. A ratio is the median of the per-round ratios; (noisy) marks a spread "
        f"(interquartile range over the median) above {NOISY_SPREAD:.0%}.",
        "",
    ]
    model = _model_table(results, norms, workload)
    if len(model) > 2:
        count = _COUNTS[len(slots)] if len(slots) < len(_COUNTS) else str(len(slots))
        lines += [f"{_title(workload)}, the norm in all {count} slots:", "", *model, ""]
    layers = _layer_table(results, norms, slots)
    if layers:
        shapes = ", ".join(
            f"{slot.name} (B, {slot.channels}{''.join(f', {s}' for s in slot.spatial)})"
            for slot in slots
        )
        lines += [
            f"One norm layer alone, ratios at {_title(workload)}'s shapes {shapes}:",
            "",
            *layers,
            "",
        ]
    pipeline = data.get("end_to_end")
    if pipeline:
        epochs = pipeline.get("epochs", 1)
        span = "one epoch" if epochs == 1 else f"{epochs} epochs"
        lines += [
            f"End to end, `{pipeline['norm']}`, {span} of {pipeline['examples']:,} training "
            f"examples, each followed by the test:" if epochs > 1 else
            f"End to end, `{pipeline['norm']}`, {span} of {pipeline['examples']:,} training "
            "examples plus the test:",
            "",
            "| pipeline | examples/s |",
            "| --- | ---: |",
            f"| harness | {pipeline['harness_examples_per_sec']:,.0f} |",
            f"| textbook `DataLoader` pipeline | {pipeline['textbook_examples_per_sec']:,.0f} |",
            f"| ratio | **{pipeline['ratio']:.2f}** |",
        ]  # fmt: skip
        if pipeline.get("compiled_examples_per_sec") is not None:
            lines += [
                "| harness, `--compile` (compile time included) | "
                f"{pipeline['compiled_examples_per_sec']:,.0f} |",
                f"| ratio, `--compile` | **{pipeline['compiled_ratio']:.2f}** |",
            ]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _section(text: str, page: Path) -> tuple[int, int]:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise NormzooError(f"{page}: needs the markers {BEGIN} and, after it, {END}")
    return begin + len(BEGIN), end


def require_section(page: Path | str) -> None:
    """Raise :class:`NormzooError` unless ``page`` exists and has the section's markers (checked
    before a measurement starts, not after)."""
    page = Path(page)
    try:
        text = page.read_text(encoding="utf-8")
    except OSError as error:
        raise NormzooError(f"cannot read the page {page}: {error.strerror}") from None
    _section(text, page)


def write(page: Path | str, data: dict[str, Any]) -> Path:
    """Store ``data`` beside ``page`` and rewrite the page's section from it; returns the
    stored file. The page is read just before it is written, so edits made meanwhile stay."""
    page = Path(page)
    require_section(page)
    stored = stored_path(page)
    atomic_write_json(stored, data)
    text = page.read_text(encoding="utf-8")
    begin, end = _section(text, page)
    page.write_text(text[:begin] + "\n" + render(data) + "\n" + text[end:], encoding="utf-8")
    return stored


def find_pages(paths: list[Path | str]) -> list[Path]:
    """Markdown files at ``paths`` (files, or directories searched recursively) that hold a
    bench section."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.rglob("*.md")) if path.is_dir() else [path]
    return [
        f for f in files if f.is_file() and BEGIN in f.read_text(encoding="utf-8", errors="replace")
    ]


def check(paths: list[Path | str]) -> list[str]:
    """Problems with the bench sections of the pages at ``paths``, one line each: a missing
    stored measurement, one of a workload not registered here, or a section that differs from
    its rendering (the first line)."""
    problems = []
    for page in find_pages(paths):
        text = page.read_text(encoding="utf-8")
        try:
            begin, end = _section(text, page)
            data = json.loads(stored_path(page).read_text(encoding="utf-8"))
            wanted = render(data)
        except (NormzooError, OSError, ValueError) as error:
            problems.append(f"{page}: bench section: {error}")
            continue
        first_line = text[:begin].count("\n") + 1
        found = text[begin:end].strip("\n").split("\n")
        for offset, (want, have) in enumerate(zip_longest(wanted.split("\n"), found)):
            if want != have:
                problems.append(
                    f"{page}:{first_line + offset + 1}: bench section differs from "
                    f"{stored_path(page).name}: expected {want!r}, found {have!r}; rerun the "
                    "command it names"
                )
                break
    return problems
