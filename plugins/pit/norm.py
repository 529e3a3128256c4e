"""The ``pit`` module: a knot table from the batch in train mode, from running statistics in
eval mode, and the rules that keep those running statistics."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from normzoo import distributed
from normzoo.base import NormBase
from normzoo.interface import AFFINE, MOMENTUM, SYNC, Option, check_batch_size, check_input
from normzoo.stats import upcast
from normzoo_plugins.pit import kernel
from normzoo_plugins.pit.knots import (
    in_tie_run,
    knot_probabilities,
    knot_sample,
    sample_table,
    slice_means,
    sort_rows,
)
from normzoo_plugins.pit.table import KnotTable, Lookup, lookup_transform

NAME = "pit"
#: Fewest values per channel the running knots are placed from (small batches are pooled).
GRID_VALUES = 256
#: Cells of the lookup table per knot: the table interpolates the transform between the outer
#: knots on a uniform grid this many times finer than the knots, one lookup per value.
CELLS_PER_KNOT = 16


def _resample(knots: torch.Tensor, at: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """Rows of ``knots`` ``(C, K)`` given at increasing positions ``at`` ``(K,)``, linearly
    interpolated (and extrapolated from the outer pairs) at positions ``to``."""
    right = torch.searchsorted(at, to).clamp(1, len(at) - 1)
    frac = (to - at[right - 1]) / (at[right] - at[right - 1])
    return knots[:, right - 1] + frac * (knots[:, right] - knots[:, right - 1])


def _initial_knots(num_features: int, num_knots: int) -> torch.Tensor:
    """``Phi^-1(p_k)`` for every channel: an untrained module standardizes."""
    knots = torch.special.ndtri(knot_probabilities(num_knots)).to(torch.float32)
    return knots.expand(num_features, -1).clone()


def _initial_probabilities(num_features: int, num_knots: int) -> torch.Tensor:
    return knot_probabilities(num_knots).to(torch.float32).expand(num_features, -1).clone()


class PIT(NormBase):
    """Probability integral transform normalization; the statistics live in registered buffers.

    Parameters
    ----------
    num_features, layout, momentum, affine:
        As for :class:`~normzoo.NormBase`.
    num_knots:
        ``K``: knots of the piecewise-linear distribution function, in both modes.
    sample_size:
        Most values per channel sorted for the knots in train mode.
    delta:
        Probabilities are clipped to ``[delta, 1 - delta]`` (train: ``max(delta, 1/(2n))``).
    sync:
        Under torch.distributed with several processes, the train-mode knots come from the
        values of every process: each process's sample (at most ``sample_size`` values per
        channel, taken at its own stride) is gathered, padded to the largest for the
        collective, and the gradient flows back to each process's share. Exact while every
        process holds at most ``sample_size`` values per channel; beyond that the union of the
        processes' subsamples stands in for one subsample of the global batch (the same
        evenly spaced approximation, with each process's stride).

    State-dict version 3 (PIT v2) replaced ``running_mean``, ``running_var`` and the
    standardized ``running_knots`` by ``running_knots`` in the input's units and the running
    distribution function ``running_below`` / ``running_at_or_below``; older state dicts are
    converted (``x_k = mean + sqrt(var + 1e-5) * z_k``, both limits ``p_k``): v2's transform of
    v1's table.
    """

    _version = 3
    _LEGACY_EPS = 1e-5

    def __init__(
        self,
        num_features: int,
        layout: str,
        num_knots: int,
        sample_size: int,
        delta: float,
        momentum: float | None,
        affine: bool,
        sync: bool,
    ) -> None:
        self._eval_cache: dict[torch.dtype, tuple[Lookup, kernel.FusedTable | None]] = {}
        super().__init__(num_features, layout, self._LEGACY_EPS, momentum, affine)
        self.sync = sync
        self.num_knots = num_knots
        self.sample_size = sample_size
        self.cells = CELLS_PER_KNOT * num_knots
        self.delta = delta
        probabilities = partial(_initial_probabilities, num_features, num_knots)
        self.register_running_stat(
            "running_knots", partial(_initial_knots, num_features, num_knots)
        )
        self.register_running_stat("running_below", probabilities)
        self.register_running_stat("running_at_or_below", probabilities)
        # what is pending between moves of the knots (not persistent: a loaded module starts
        # afresh): the weighted knots of the batches since the last move, the weight the old
        # knots keep, the latest batch's knots (for its atoms), and small batches' values
        self.register_buffer("pending_knots", torch.zeros(num_features, num_knots), False)
        self.register_buffer("pending_keep", torch.tensor(1.0, dtype=torch.float64), False)
        self.register_buffer("latest_knots", torch.zeros(num_features, num_knots), False)
        self.register_buffer("knot_reservoir", torch.zeros(num_features, GRID_VALUES), False)
        self.register_buffer("reservoir_fill", torch.tensor(0), False)
        self.register_buffer("reservoir_keep", torch.tensor(1.0, dtype=torch.float64), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME)
        layout = self.layout_spec
        values = upcast(x)
        if self.training:
            n = layout.values_per_channel(x) if x.numel() else 0
            sample = knot_sample(values, layout, self.sample_size)
            if distributed.active(self.sync):
                sample = distributed.gather_columns(sample)
                (total,) = distributed.sum_over_processes(torch.tensor(float(n)))
                n = int(total)
                check_batch_size(x, NAME, self.layout, values=n)
            else:
                check_batch_size(x, NAME, self.layout)
            sorted_sample = sort_rows(sample)
            knots = slice_means(sorted_sample, self.num_knots)
            below, at_or_below = sample_table(sorted_sample.detach(), knots.detach())
            table = KnotTable(knots, below, at_or_below, max(self.delta, 0.5 / n))
            self._update_running_stats(knots.detach(), sorted_sample.detach())
            # a table finer than the batch costs more to build than it saves
            cells = min(self.cells, max(4 * self.num_knots, n // 8))
            lookup = table.lookup(cells)
            y = lookup_transform(values, lookup, layout)
        else:
            lookup, fused = self._eval_lookup(values)
            y = lookup_transform(values, lookup, layout, fused)
        return self.affine_transform(y).to(x.dtype)

    def _eval_lookup(self, values: torch.Tensor) -> tuple[Lookup, kernel.FusedTable | None]:
        """The running table's lookup (and its fused form on the CPU), built once per dtype
        until the statistics change."""
        dtype = values.dtype
        if dtype not in self._eval_cache:
            table = KnotTable(
                self.running_knots.to(dtype),
                self.running_below.to(dtype),
                self.running_at_or_below.to(dtype),
                self.delta,
            )
            lookup = table.lookup(self.cells)
            fused = kernel.FusedTable(lookup, dtype) if kernel.supports(values) else None
            self._eval_cache[dtype] = lookup, fused
        return self._eval_cache[dtype]

    def running_stats_changed(self) -> None:
        self._eval_cache = {}

    def _apply(self, fn: Callable, recurse: bool = True) -> PIT:  # .to(), .cuda(), .half() ...
        self._eval_cache = {}  # the cached lookups would stay on the old device and dtype
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def _update_running_stats(self, knots: torch.Tensor, sorted_sample: torch.Tensor) -> None:
        """Average this batch into the running table (see the module docstring).

        The running distribution function is updated at every batch, at the current knots,
        which costs two searches of the sorted sample. The knots themselves move less often:
        the batches' knots are averaged on the side (with the same weights the running average
        would give them) and the knots move once that average carries half the weight, or at
        the first batch after a reset, whose knots replace the placeholder outright. Moving the
        knots means carrying the running distribution function over to them, which costs a
        few hundred small tensor operations: done at every batch it would dominate the cost of
        small layers.
        """
        weight = self.running_average_weight()
        first = int(self.num_batches_tracked) == 1
        if first:
            weight = 1.0
        self._accumulate_knots(knots, sorted_sample, weight, first)
        if first or float(self.pending_keep) <= 0.5:
            self._move_knots()
        dtype = self.running_below.dtype
        points = self.running_knots.to(sorted_sample.dtype)
        below, at_or_below = sample_table(sorted_sample, points)
        self.running_below.lerp_(below.to(dtype), weight)
        self.running_at_or_below.lerp_(at_or_below.to(dtype), weight)
        self.running_stats_changed()

    def _accumulate_knots(
        self, knots: torch.Tensor, sorted_sample: torch.Tensor, weight: float, first: bool
    ) -> None:
        """Add a batch's knots to the pending average with the given weight.

        Knots estimated from a few values are too coarse: batches with fewer than
        :data:`GRID_VALUES` values per channel are pooled until that many are in, and the
        pooled knots then count with the weight of all the batches they stand for."""
        if sorted_sample.shape[1] < GRID_VALUES and not first:
            fill = int(self.reservoir_fill)
            take = min(sorted_sample.shape[1], GRID_VALUES - fill)
            pool = self.knot_reservoir
            spread = torch.linspace(0, sorted_sample.shape[1] - 1, take, device=pool.device)
            chosen = sorted_sample.index_select(1, spread.round().long())  # evenly spaced
            pool[:, fill : fill + take] = chosen.to(pool.dtype)
            self.reservoir_fill += take
            self.reservoir_keep *= 1.0 - weight
            if int(self.reservoir_fill) < GRID_VALUES:
                return
            knots = slice_means(sort_rows(pool.to(knots.dtype)), self.num_knots)
            weight = 1.0 - float(self.reservoir_keep)
            self.reservoir_fill.zero_()
            self.reservoir_keep.fill_(1.0)
        self.pending_knots.lerp_(knots.to(self.pending_knots.dtype), weight)
        self.pending_keep *= 1.0 - weight
        self.latest_knots.copy_(knots)

    def _move_knots(self) -> None:
        """Move the running knots to their pending average and carry the running distribution
        function over to them. A knot that the latest batch puts on an atom (a run of equal
        knots) goes there exactly: an average would only approach the atom, and its values
        would miss their mid-p value."""
        dtype = torch.promote_types(self.running_knots.dtype, torch.float32)  # ndtri: no half
        old = KnotTable(
            self.running_knots.to(dtype),
            self.running_below.to(dtype),
            self.running_at_or_below.to(dtype),
            self.delta,
        )
        averaged = torch.addcmul(
            self.pending_knots.to(dtype), old.knots, self.pending_keep.to(dtype)
        )
        latest = self.latest_knots.to(dtype)
        knots = torch.where(in_tie_run(latest), latest, averaged).cummax(dim=1).values
        below, at_or_below = old.cdf_limits(knots)
        self.running_knots.copy_(knots)
        self.running_below.copy_(below)
        self.running_at_or_below.copy_(at_or_below)
        self._clear_pending()

    def _clear_pending(self) -> None:
        self.pending_knots.zero_()
        self.pending_keep.fill_(1.0)
        self.reservoir_fill.zero_()
        self.reservoir_keep.fill_(1.0)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "latest_knots"):  # not yet while __init__ runs
            self._clear_pending()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._clear_pending()  # pooled values belong to the statistics just replaced

    def upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        """PIT v1 (state-dict versions 1 and 2) kept standardized knots ``z_k`` at ``p_k`` with
        ``running_mean`` and ``running_var``: its table is ``x_k = mean + sqrt(var + eps) z_k``
        with both limits ``p_k``, resampled (linearly in the probit scale) to this module's
        ``num_knots`` when they differ."""
        super().upgrade_state_dict(state_dict, prefix, version)
        if version >= 3 or prefix + "running_var" not in state_dict:
            return
        mean = state_dict.pop(prefix + "running_mean")
        var = state_dict.pop(prefix + "running_var")
        standardized = state_dict[prefix + "running_knots"]
        knots = mean.unsqueeze(1) + torch.sqrt(var + self._LEGACY_EPS).unsqueeze(1) * standardized
        old = knot_probabilities(standardized.shape[1])
        new = knot_probabilities(self.num_knots)
        if len(old) != len(new):
            knots = _resample(knots.double(), torch.special.ndtri(old), torch.special.ndtri(new))
        limits = new.to(standardized.dtype).expand(len(knots), -1).clone()
        state_dict[prefix + "running_knots"] = knots.to(standardized.dtype)
        state_dict[prefix + "running_below"] = limits
        state_dict[prefix + "running_at_or_below"] = limits.clone()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, layout={self.layout!r}, num_knots={self.num_knots}, "
            f"sample_size={self.sample_size}, delta={self.delta}, momentum={self.momentum}, "
            f"affine={self.affine}"
        )


OPTIONS = (
    Option("num_knots", int, 64, "knots of the piecewise-linear distribution function", 2, 1024),
    Option("sample_size", int, 4096, "most values per channel sorted for the knots", 64),
    # delta's range follows from z(p) = Phi^-1(clip(p, delta, 1 - delta)), computed in float32:
    # below ~6e-8 (float32's spacing under 1) 1 - delta rounds to 1 and the upper tail maps to
    # inf, so the minimum 1e-6 keeps both tails finite (|y| <= Phi^-1(1 - 1e-6) = 4.75) with a
    # margin. The maximum 0.25 is the largest clip the train rule max(delta, 1/(2n)) reaches
    # itself (n = 2 values per channel); beyond it the clip maps more than half of the values
    # onto +-0.67, and at 0.5 the range [delta, 1 - delta] is empty.
    Option("delta", float, 1e-6, "clip F to [delta, 1-delta]; train: >= 1/(2n)", 1e-6, 0.25),
    MOMENTUM,
    AFFINE,
    SYNC,
)
