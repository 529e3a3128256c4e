"""A comparison page: Markdown with an experiment block and a generated section.

The experiment is a fenced block with the info string ``normzoo`` holding TOML::

    ```normzoo
    seeds = 3                      # or a list: [0, 1, 2]
    baseline = "batchnorm"         # the variant every other is paired with
    results = "../results"         # where run results live, relative to the page
    figures = "."                  # where the plots go, relative to the page

    [base]                         # harness settings shared by every variant
    epochs = 10
    norm = "batchnorm"

    [grid]                         # every combination of these values is a variant ...
    lr = [0.1, 1.0]

    [[variant]]                    # ... combined with each of these (label optional)
    label = "no bias"
    bias_before_norm = false

    [[variant]]
    label = "batch 16"
    batch_size = 16
    seeds = 2                      # a variant's own seeds, where the budget fits fewer

    [[variant]]
    label = "no bias, batch 16"
    bias_before_norm = false
    batch_size = 16
    seeds = 2
    baseline = "batch 16"          # paired with this variant instead of the page's baseline
    ```

A page may tune each variant before comparing (the protocol of DeepOBS and AlgoPerf: every
variant gets the same tuning budget, chosen on held-out training data, reported on the test
set over fresh seeds)::

    [tune]                         # every combination is one trial per tuning seed
    lr = [0.1, 0.3, 1.0, 3.0]
    seeds = [100]                  # tuning seeds (default [100]): a count or a list
    val_split = 10000              # training examples held out to choose on (default 10000)

Each variant runs every trial on the training set less the validation split, evaluated on the
split; its choice (:mod:`~normzoo.compare.tune`) then runs with the page's seeds on the whole
training set and is tested on the test set. A tuned setting may not be set by ``base``,
``grid`` or a variant (the trials set it).

Keys of ``base``, ``grid`` and a variant are the fields of
:class:`~normzoo.harness.config.RunConfig` that say what a run computes
(:data:`~normzoo.harness.config.COMPUTED_FIELDS` but ``seed``: ``workload``, ``norm``,
``norm_options``, ``activation``, ``placement``, ``bias_before_norm``, ``dropout``,
``freeze_affine``, ``epochs``, ``lr``, ``batch_size``, ``train_subset``, ``test_subset``,
``precise_examples``, or in its older spelling ``precise_stats``, in batches). A setting
that neither ``base``, ``grid`` nor the variant gives is the workload's declared default,
else the harness's (:meth:`~normzoo.harness.config.RunConfig.for_workload`). The results
are written between the markers :data:`BEGIN` and :data:`END`; nothing else on the page is
ever touched. So the markers appear once each, the begin marker first, and both outside the
experiment block (below it, usually): a section that enclosed or cut into the block would
overwrite the experiment with its table.

A page is refused, in one line, before anything trains, when what it asks for could not end
well: more than :data:`MAX_VARIANTS` variants ([grid] combinations times ``[[variant]]``
tables, counted before any is built), more than :data:`MAX_SEEDS` seeds or a seed listed twice
(each seed is one run, its result stored under one name), no variant (``variant = []``), or a
``results`` or ``figures`` folder that is a file, is under one, or (for ``normzoo compare``,
which writes them) cannot be written: otherwise every run would train first and fail to store.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from normzoo.errors import NormzooError, suggest
from normzoo.harness.config import COMPUTED_FIELDS, RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BEGIN = "<!-- normzoo:results:begin -->"
END = "<!-- normzoo:results:end -->"
_FENCE = re.compile(r"^```normzoo[ \t]*\r?\n(.*?)^```[ \t]*\r?$", re.M | re.S)  # LF or CRLF
_TOP_KEYS = (
    "seeds", "baseline", "results", "figures", "plots", "base", "grid", "variant", "tune",
)  # fmt: skip
_TUNE_KEYS = ("seeds", "val_split")
#: The plots a page can ask for; ``affine`` shows the learned gamma and beta per layer.
PLOTS = ("curves", "finals", "affine")
#: The plot a tuned page adds: validation accuracy against the tuned setting, per variant.
TUNING_PLOT = "tuning"
#: What a page may set: what a run computes, but the seed (the page's ``seeds`` give it) and
#: the validation split (a page reports on the test set; ``[tune]`` holds out its own split).
SETTINGS = (
    *(name for name in COMPUTED_FIELDS if name not in ("seed", "val_split")),
    "precise_stats",  # the older spelling of precise_examples, in batches
)
#: The most variants one page may hold: past it the planning alone takes minutes, and the runs
#: would take far longer; a bigger sweep is several pages.
MAX_VARIANTS = 1000
#: The most seeds one variant may run (a count beyond it would not even fit in memory).
MAX_SEEDS = 1000
#: The most trials one variant may tune with (combinations times tuning seeds).
MAX_TRIALS = 100
#: A ``[tune]`` table's defaults: the tuning seeds (apart from the usual comparison seeds
#: ``0 .. n-1``, so that no trial shares its seed with a reported run) and the validation
#: split (a sixth of Fashion-MNIST's training set, the test set's size).
TUNE_SEEDS = [100]
TUNE_VAL_SPLIT = 10_000


class PageError(NormzooError):
    """A page cannot be read as a comparison; the message names the page and line."""


@dataclass(frozen=True)
class Tune:
    """A page's ``[tune]`` table: the settings searched, each with its values in order, the
    tuning seeds and the validation split."""

    space: dict[str, list[Any]]
    seeds: list[int]
    val_split: int

    def trials(self) -> list[dict[str, Any]]:
        """Every combination of the searched values, the first setting varying slowest."""
        return [dict(zip(self.space, values, strict=True))
                for values in itertools.product(*self.space.values())]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: a label and the harness settings it runs with."""

    label: str
    settings: dict[str, Any]
    #: The variant's own seeds, where a budget fits fewer runs than the page's ``seeds``.
    seeds: list[int] | None = None
    #: The label of the variant it is paired with, where not the page's baseline.
    baseline: str | None = None

    def config(self, seed: int) -> RunConfig:
        return RunConfig.for_workload(**self.settings, seed=seed)


@dataclass
class Page:
    """A parsed comparison page.

    ``path`` is the page's file, through any symbolic link: its folders are relative to it, and
    its rewrite replaces it, not the link. ``text`` is the whole file as it is (its line
    endings kept); ``block_line`` the line of the experiment block (1-based); ``begin``/``end``
    the character offsets of the generated section's content (between the markers).
    """

    path: Path
    text: str
    block_line: int
    plots: list[str]
    variants: list[Variant]
    seeds: list[int]
    baseline: str
    results_dir: Path
    figures_dir: Path
    begin: int
    end: int
    tune: Tune | None = None

    @property
    def generated(self) -> str:
        return self.text[self.begin : self.end]

    @property
    def generated_line(self) -> int:
        return self.text.count("\n", 0, self.begin) + 1

    @property
    def newline(self) -> str:
        """The page's line ending: ``"\\r\\n"`` where most of its lines end so, else ``"\\n"``."""
        return "\r\n" if 2 * self.text.count("\r\n") > self.text.count("\n") else "\n"

    def as_written(self, section: str) -> str:
        """``section`` (lines ending ``"\\n"``) with the page's line endings."""
        return section if self.newline == "\n" else re.sub(r"(?<!\r)\n", "\r\n", section)

    def with_generated(self, section: str) -> str:
        """The page with ``section`` between its markers, in the page's line endings; every
        other character as it is."""
        return self.text[: self.begin] + self.as_written(section) + self.text[self.end :]

    def where(self, line: int | None = None) -> str:
        return f"{self.path}:{line if line is not None else self.block_line}"


def find_pages(paths: list[Path | str]) -> list[Path]:
    """The Markdown files named, and those under named directories that hold an experiment
    block, sorted, each file once (a symbolic link and the page it leads to are one page); a
    path that does not exist is an error naming it."""
    pages: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            # undecodable bytes cannot hide a block; a page that has one and is not UTF-8 is
            # refused by name when it is parsed
            found = sorted(path.rglob("*.md"))
            pages += [p for p in found if _FENCE.search(p.read_text("utf-8", errors="replace"))]
        elif path.is_file():
            pages.append(path)
        else:
            raise PageError(f"{path}: no such file or directory")
    unique: dict[Path, Path] = {}
    for page in pages:
        unique.setdefault(page.resolve(), page)
    return list(unique.values())


def parse_page(path: Path | str) -> Page:
    """Read ``path`` and its experiment block; raises :class:`PageError` naming the line.

    A ``path`` that is a symbolic link stands for the file it leads to (the page's ``path``):
    its ``results`` and ``figures`` are relative to that file's folder, not the link's.
    """
    path = Path(path)
    try:
        # as it is: newline="" keeps CRLF line endings, which the rewrite keeps
        with open(path, encoding="utf-8", newline="") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise PageError(f"{path}: cannot be read as UTF-8 text: {error}") from None
    if path.is_symlink():
        real = os.path.realpath(path)
        path = Path(real if path.is_absolute() else os.path.relpath(real))
    blocks = list(_FENCE.finditer(text))
    if len(blocks) != 1:
        raise PageError(
            f"{path}: needs exactly one ```normzoo experiment block, found {len(blocks)}"
        )
    match = blocks[0]
    line = text.count("\n", 0, match.start()) + 1
    try:
        spec = tomllib.loads(match.group(1))
    except tomllib.TOMLDecodeError as error:
        raise PageError(f"{_toml_error_location(path, line, error)}: the experiment block is not "
                        f"valid TOML: {_TOML_AT.sub('', str(error))}") from None  # fmt: skip
    where = f"{path}:{line}"
    for key in spec:
        if key not in _TOP_KEYS:
            raise PageError(f"{where}: {suggest('experiment key', key, _TOP_KEYS)}")
    for key in ("baseline", "results", "figures"):
        if key in spec and not isinstance(spec[key], str):
            raise PageError(f"{where}: {key} must be a string, got {spec[key]!r}")
    variants = _variants(spec, where)
    seeds = _seeds(spec.get("seeds", 3), where)
    tune = _tune(spec["tune"], where, variants) if "tune" in spec else None
    by_label = {v.label: v for v in variants}
    labels = list(by_label)
    baseline = spec.get("baseline", labels[0])
    if baseline not in labels:
        raise PageError(f"{where}: {suggest('baseline', baseline, labels)}")
    for variant in variants:
        own = variant.baseline or baseline
        if own not in labels:
            unknown = suggest("baseline", own, labels)
            raise PageError(f"{where}: variant {variant.label!r}: {unknown}")
        paired = set(by_label[own].seeds or seeds)
        unpaired = sorted(set(variant.seeds or seeds) - paired)
        if unpaired:
            raise PageError(
                f"{where}: variant {variant.label!r} has seeds {unpaired} that its baseline "
                f"{own!r} does not run, so they could not be paired; give it a subset of "
                "the baseline's seeds"
            )
    plots = spec.get("plots", ["curves", "finals"])
    if not isinstance(plots, list):
        raise PageError(f'{where}: plots must be a list, e.g. ["curves", "finals"]')
    for plot in plots:
        if plot not in PLOTS:
            raise PageError(f"{where}: {suggest('plot', str(plot), PLOTS)}")
    plots = [*plots, TUNING_PLOT] if tune else plots
    begin, end = _section(path, text, match)
    return Page(
        path=path,
        text=text,
        block_line=line,
        plots=plots,
        variants=variants,
        seeds=seeds,
        baseline=baseline,
        results_dir=_folder(path, where, "results", spec.get("results", "results")),
        figures_dir=_folder(path, where, "figures", spec.get("figures", ".")),
        begin=begin,
        end=end,
        tune=tune,
    )


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _section(path: Path, text: str, block: re.Match[str]) -> tuple[int, int]:
    """The offsets of the generated section's content: after the one :data:`BEGIN`, before
    the one :data:`END`, outside the experiment ``block`` (which compare would overwrite)."""
    found = {marker: [m.start() for m in re.finditer(re.escape(marker), text)]
             for marker in (BEGIN, END)}  # fmt: skip
    if not found[BEGIN] or not found[END]:
        raise PageError(
            f"{path}: needs the markers {BEGIN} and, after it, {END}: add the two lines where "
            "the results should go (e.g. below the experiment block)"
        )
    for marker, offsets in found.items():
        if len(offsets) > 1:
            lines = ", ".join(str(_line(text, offset)) for offset in offsets)
            raise PageError(
                f"{path}:{_line(text, offsets[0])}: {marker} appears {len(offsets)} times "
                f"(lines {lines}); keep one pair of markers, {BEGIN} then {END}"
            )
    (begin,), (end,) = found[BEGIN], found[END]
    if end < begin:
        raise PageError(
            f"{path}:{_line(text, end)}: {END} (line {_line(text, end)}) comes before {BEGIN} "
            f"(line {_line(text, begin)}); put the begin marker first"
        )
    if begin < block.end() and block.start() < end + len(END):
        raise PageError(
            f"{path}:{_line(text, begin)}: the markers (lines {_line(text, begin)} and "
            f"{_line(text, end)}) enclose or cut into the experiment block (lines "
            f"{_line(text, block.start())}-{_line(text, block.end())}), which the results "
            "would overwrite; put both markers below the block's closing ```"
        )
    return begin + len(BEGIN), end


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (or is a link, even a broken one)."""
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def _folder(page: Path, where: str, key: str, value: str) -> Path:
    """The folder ``key = value`` names, beside ``page``; a file there (or above it) is refused
    now, not after every run has trained and failed to store its result."""
    folder = page.parent / value
    existing = _nearest_existing(folder)
    if existing.is_dir():
        return folder
    what = "is" if existing == folder else f"is under {existing}, which is"
    broken = existing.is_symlink() and not existing.exists()
    kind = "a broken symbolic link" if broken else "a file, not a folder"
    raise PageError(f'{where}: {key} = "{value}": {folder} {what} {kind}; name a folder')


def check_writable(page: Page, results: bool = True) -> None:
    """Raise :class:`PageError` when the page's plots' folder, or with ``results`` its results
    folder, cannot be written: checked before any run trains, so that a read-only folder costs
    no training (each result is stored the moment its run ends)."""
    for key, folder, needed in (
        ("results", page.results_dir, results),
        ("figures", page.figures_dir, bool(page.plots)),
    ):
        existing = _nearest_existing(folder)
        if needed and not os.access(existing, os.W_OK | os.X_OK):
            below = "" if existing == folder else f" ({existing}, where it would be made, is not)"
            raise PageError(
                f"{page.where()}: {key} folder {folder} is not writable{below}; make it writable "
                f"or set {key} to another folder"
            )


_TOML_AT = re.compile(r" \(at line (\d+), column (\d+)\)")


def _toml_error_location(path: Path, fence_line: int, error: tomllib.TOMLDecodeError) -> str:
    """``PAGE:LINE:COLUMN`` of a TOML error: tomllib counts lines from the block's start."""
    at = _TOML_AT.search(str(error))
    if at is None:
        return f"{path}:{fence_line}"
    return f"{path}:{fence_line + int(at[1])}:{at[2]}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seeds(value: Any, where: str) -> list[int]:
    """A ``seeds`` entry, a count ``n`` (seeds ``0 .. n-1``) or a list, as a list; at most
    :data:`MAX_SEEDS`, counted before the list is built, each seed once (a seed is one run)."""
    count = value if _is_int(value) else len(value) if isinstance(value, list) else 0
    if count > MAX_SEEDS:
        raise PageError(
            f"{where}: seeds: {count} seeds is more than MAX_SEEDS = {MAX_SEEDS} per variant; "
            "give fewer seeds"
        )
    seeds = list(range(value)) if _is_int(value) and value >= 1 else value
    if not (isinstance(seeds, list) and seeds and all(_is_int(s) and s >= 0 for s in seeds)):
        raise PageError(
            f"{where}: seeds must be a count >= 1 or a list of integers >= 0, got {value!r}"
        )
    repeated = [(seed, n) for seed, n in Counter(seeds).items() if n > 1]
    if repeated:
        seed, n = repeated[0]
        raise PageError(f"{where}: seeds: seed {seed} is listed {n} times; list each seed once")
    return seeds


def _tune(table: Any, where: str, variants: list[Variant]) -> Tune:
    """The ``[tune]`` table: at least one searched setting with a non-empty list of distinct
    values, none that a variant already sets, and at most :data:`MAX_TRIALS` trials."""
    if not isinstance(table, dict):
        raise PageError(f"{where}: tune must be a table ([tune]), got {table!r}")
    table = dict(table)
    seeds = _seeds(table.pop("seeds", TUNE_SEEDS), f"{where}: [tune]")
    val_split = table.pop("val_split", TUNE_VAL_SPLIT)
    if not _is_int(val_split) or val_split < 1:
        raise PageError(f"{where}: [tune] val_split must be a count >= 1, got {val_split!r}")
    space = _settings(table, where, "[tune]", grid=True)
    if not space:
        raise PageError(
            f"{where}: [tune] names no setting to search; add one, e.g. lr = [0.1, 0.3, 1.0]"
        )
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise PageError(f"{where}: [tune] {key} must be a non-empty list, got {values!r}")
        if len({repr(value) for value in values}) != len(values):
            raise PageError(f"{where}: [tune] {key} lists a value twice: {values!r}")
        for variant in variants:
            if key in variant.settings:
                raise PageError(
                    f"{where}: variant {variant.label!r} sets {key}, which [tune] searches; "
                    f"remove it from [base], [grid] or the variant, or from [tune]"
                )
    trials = math.prod(len(values) for values in space.values()) * len(seeds)
    if trials > MAX_TRIALS:
        raise PageError(
            f"{where}: [tune] makes {trials} trials per variant, more than MAX_TRIALS = "
            f"{MAX_TRIALS}; search fewer values or use fewer tuning seeds"
        )
    return Tune(space, seeds, val_split)


#: The type each setting must have in a page (an int is also a float; a subset may be unset).
_TYPES = {
    f.name: {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}.get(
        str(f.type).split(" |")[0], (dict,)
    )
    for f in fields(RunConfig)
} | {"precise_stats": (int,)}


def _settings(table: Any, where: str, what: str, grid: bool = False) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise PageError(f"{where}: {what} must be a table, got {table!r}")
    for key, value in table.items():
        if key not in SETTINGS:
            raise PageError(f"{where}: {what}: {suggest('setting', key, SETTINGS)}")
        for item in value if grid and isinstance(value, list) else [value]:
            kinds = _TYPES[key]
            wrong = not isinstance(item, kinds) or (bool not in kinds and isinstance(item, bool))
            if wrong:
                names = " or ".join(kind.__name__ for kind in kinds)
                raise PageError(f"{where}: {what}: {key} must be {names}, got {item!r}")
    return dict(table)


def _variants(spec: dict[str, Any], where: str) -> list[Variant]:
    base = _settings(spec.get("base", {}), where, "[base]")
    grid = _settings(spec.get("grid", {}), where, "[grid]", grid=True)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PageError(f"{where}: [grid] {key} must be a non-empty list, got {values!r}")
    listed = spec.get("variant", [{}])
    if not isinstance(listed, list) or not all(isinstance(entry, dict) for entry in listed):
        raise PageError(f"{where}: variant must be an array of tables ([[variant]])")
    if not listed:
        raise PageError(
            f"{where}: variant = [] lists no variants; add [[variant]] tables, or remove the key "
            "for one variant of the [base] settings"
        )
    combinations = math.prod(len(values) for values in grid.values())
    if combinations * len(listed) > MAX_VARIANTS:  # counted, not built: a grid can be huge
        raise PageError(
            f"{where}: {combinations * len(listed)} variants ({combinations} [grid] combinations "
            f"times {len(listed)} [[variant]] tables) is more than MAX_VARIANTS = "
            f"{MAX_VARIANTS}; shrink the grid or split the sweep over several pages"
        )
    variants: list[Variant] = []
    for combination in itertools.product(*grid.values()):
        from_grid = dict(zip(grid, combination, strict=True))
        for entry in listed:
            entry = dict(entry)
            label = entry.pop("label", None)
            if label is not None and not isinstance(label, str):
                raise PageError(f"{where}: a variant's label must be a string, got {label!r}")
            seeds = None
            if "seeds" in entry:
                seeds = _seeds(entry.pop("seeds"), f"{where}: variant {label!r}")
            own_baseline = entry.pop("baseline", None)
            if own_baseline is not None and not isinstance(own_baseline, str):
                raise PageError(
                    f"{where}: variant {label!r}: baseline must be a label, got {own_baseline!r}"
                )
            own = _settings(entry, where, "[[variant]]")
            settings = {**base, **from_grid, **own}
            if "norm_options" in settings and not isinstance(settings["norm_options"], dict):
                raise PageError(f"{where}: norm_options must be a table")
            parts = [_describe(k, v) for k, v in {**own, **from_grid}.items()]
            if label is None:
                label = ", ".join(parts) or settings.get("norm", RunConfig.norm)
            elif from_grid:
                label = ", ".join([label, *(_describe(k, v) for k, v in from_grid.items())])
            variants.append(Variant(label, settings, seeds, own_baseline))
    counts = Counter(v.label for v in variants)
    duplicated = sorted(label for label, n in counts.items() if n > 1)
    if duplicated:
        raise PageError(f"{where}: two variants share the label {duplicated[0]!r}; label them")
    return variants


def _describe(key: str, value: Any) -> str:
    if key == "norm":
        return str(value)
    if key == "norm_options":
        return " ".join(f"{k}={v}" for k, v in value.items())
    return f"{key}={value}"
