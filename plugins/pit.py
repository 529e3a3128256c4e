"""Probability integral transform (PIT) normalization: ``y = Phi^-1(F(x))`` per channel.

``F`` is the distribution function of the channel's values, ``Phi`` the standard normal one: every
channel comes out standard normal whatever its distribution. (With a Gaussian ``F`` fitted by
mean and variance the transform is plain standardization; here ``F`` is empirical.) A
per-channel affine ``weight * y + bias`` follows. docs/norms/pit.md argues the choices and
gives their measurements.

One function, two sources of statistics. Both modes transform with a *knot table* per channel:
``K`` knots ``x_1 <= ... <= x_K`` in the input's own units and, at each knot, the two limits of
the distribution function, ``F(x_k-) = P(X < x_k)`` and ``F(x_k+) = P(X <= x_k)`` (different
only where ``x_k`` is an atom, a value taken with positive probability, such as the zeros of a
ReLU). With ``z(p) = Phi^-1(clip(p, d, 1 - d))``::

    x == x_k (an atom)   y = z((F(x_k-) + F(x_k+)) / 2)                       its mid-p value
    x_k < x < x_k+1      y = z(F(x_k+)) + (x - x_k) * slope_k
                         slope_k = (z(F(x_k+1 -)) - z(F(x_k+))) / (x_k+1 - x_k)
    x < x_1, x > x_K     the outer line continued: Gaussian tails, linear in the probit scale

clipped to ``+-Phi^-1(1 - d)``. Interpolating linearly in the probit scale rather than in ``F``
is exact for Gaussian channels; linear interpolation of ``F`` cuts every convex tail segment
short.

Per value, the transform is one table lookup: the knot transform is tabulated on ``16 K`` equal
cells between the outer knots (:class:`Lookup`; exact at every cell edge, linear in between),
so a value finds its line by ``floor((x - x_1) / cell width)`` instead of a binary search among
the knots, which costs about 100 times an addition on a CPU.

Train mode takes the table from the batch (``n`` values per channel)::

    knots     slice means of the sorted knot sample: x_k = K * integral of Q over ((k-1)/K, k/K)
    F(x_k-+)  the fractions of the knot sample below / at or below x_k
    d         max(delta, 1 / (2 n))

The knot sample is the batch itself up to ``sample_size`` values per channel, else an evenly
strided subsample of that size: only it is sorted. A slice mean averages ``m / K`` order
statistics, so the gradient with respect to the knots spreads over them instead of landing on
one value; the counts are piecewise constant in the data, so their derivative is zero almost
everywhere, and autograd's gradient (through the knots and the table) is exactly that of the
function computed (float64 gradcheck passes). A run of tied values (an atom) that holds more
than ``2 / K`` of the sample contains a whole slice, so some knots sit exactly on it and its
values get their exact mid-p value, as average ranks give them.

Eval mode takes the table from running statistics: ``running_knots`` and the running
distribution function ``running_below`` / ``running_at_or_below`` at them. The empirical
distribution function of a sample is an unbiased estimate of ``F`` at every point, at any batch
size and with ties counted as in train mode, so averaging it (rather than averaging quantiles,
which are biased toward the centre at small batches, or standardized knots, whose scale differs
from the running variance's on heavy tails) makes eval consistent with train mode on
heavy-tailed, skewed and zero-inflated channels and at batches of 16 values. With weight ``w``
(``momentum``, or ``1/k`` for a cumulative average) every batch updates::

    F(knots) <- (1 - w) F(knots) + w F_batch(knots)        at the current knots

and the knots follow an average of the batch knots with the same weights, moved when the
pending average holds half the weight (and at the first batch after a reset, which replaces the
placeholder knots): then the running distribution function is carried over to the new knots
through the old table. Knots that the latest batch puts on an atom go onto it exactly. Batches
with fewer than ``GRID_VALUES`` values per channel are pooled before their knots count: knots of
16 values are too coarse to place a grid. A fresh module has standard normal knots and
``F = Phi``: it standardizes.

float16 and bfloat16 inputs are transformed in float32 (``ndtri`` has no half kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from normzoo.base import NormBase
from normzoo.hookspecs import hookimpl
from normzoo.interface import (
    AFFINE,
    MOMENTUM,
    NormInfo,
    Option,
    check_batch_size,
    check_input,
)
from normzoo.layouts import LAYOUT_NAMES, Layout
from normzoo.stats import upcast

NAME = "pit"
#: Fewest values per channel the running knots are placed from (small batches are pooled).
GRID_VALUES = 256
#: Cells of the lookup table per knot: the table interpolates the transform between the outer
#: knots on a uniform grid this many times finer than the knots, one lookup per value.
CELLS_PER_KNOT = 16


def knot_probabilities(num_knots: int) -> torch.Tensor:
    """``p_k = (k - 0.5) / K`` for ``k = 1..K``, in float64."""
    return (torch.arange(num_knots, dtype=torch.float64) + 0.5) / num_knots


def slice_means(sorted_rows: torch.Tensor, num_slices: int) -> torch.Tensor:
    """``K`` slice means ``K * integral of Q(u) over [(k-1)/K, k/K]`` per row: ``(C, K)``.

    ``Q`` is the quantile function that interpolates the sorted values linearly between order
    statistics (numpy's default quantile), so its integral is a running sum of trapezoids (kept
    in float64). Each mean averages about ``n / K`` order statistics: its gradient spreads
    evenly over them. A slice that lies within a run of equal values is exactly that value.
    """
    c, n = sorted_rows.shape
    if n == 1:
        return sorted_rows.expand(c, num_slices)
    s = sorted_rows.to(torch.float64)
    running = torch.cat([s.new_zeros(c, 1), ((s[:, 1:] + s[:, :-1]) / 2).cumsum(dim=1)], dim=1)
    x = torch.arange(num_slices + 1, dtype=torch.float64) * ((n - 1) / num_slices)
    j = x.floor().long().clamp(max=n - 2)
    f = (x - j).to(s.device)
    j = j.to(s.device)
    lo, hi = s[:, j], s[:, j + 1]
    integral = running[:, j] + f * lo + (f * f / 2) * (hi - lo)
    means = (integral[:, 1:] - integral[:, :-1]) * (num_slices / (n - 1))
    # a slice inside a run of ties is that value exactly, not a rounding of it
    flat = lo[:, 1:].eq(hi[:, :-1]) & lo[:, :-1].eq(hi[:, 1:]) & lo[:, :-1].eq(lo[:, 1:])
    return torch.where(flat, lo[:, :-1], means).to(sorted_rows.dtype)


def knot_sample(x: torch.Tensor, layout: Layout, sample_size: int) -> torch.Tensor:
    """The values of ``x`` the knots are estimated from, as ``(C, m)``: all of them, or about
    ``sample_size`` per channel taken at an even stride, copying only those."""
    n = layout.values_per_channel(x)
    stride = -(-n // sample_size)
    if layout.channels_last or x.dim() == 2:
        return x.reshape(-1, x.shape[-1])[::stride].t()
    grouped = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions)
    positions = grouped.shape[2]
    if stride <= positions:
        grouped = grouped[:, :, ::stride]
    else:
        grouped = grouped[:: -(-stride // positions)]
    return grouped.transpose(0, 1).reshape(x.shape[1], -1)


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` sorted along dim 1, differentiably (a gather). On the CPU numpy's argsort
    finds the order: it is several times faster than ``torch.sort`` on short rows."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float64):
        return rows.sort(dim=1).values
    order = np.argsort(rows.detach().numpy(), axis=1)
    return rows.gather(1, torch.from_numpy(order))


def _probit(p: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.special.ndtri(p.clamp(delta, 1.0 - delta))


class KnotTable:
    """The per-channel table both modes transform with: knots ``(C, K)`` and the distribution
    function's left and right limits at them, ``below`` = ``F(x_k-)``, ``at_or_below`` =
    ``F(x_k+)``, with probabilities clipped to ``[delta, 1 - delta]``.

    Everything here works on ``(C, K)``-sized tensors with differentiable tensor code, so
    autograd carries gradients back to the knots; :meth:`lookup` turns the table into the
    per-value :class:`Lookup`.
    """

    def __init__(
        self, knots: torch.Tensor, below: torch.Tensor, at_or_below: torch.Tensor, delta: float
    ) -> None:
        self.knots, self.below, self.at_or_below, self.delta = knots, below, at_or_below, delta
        self.low, self.high = _probit(below, delta), _probit(at_or_below, delta)
        detached = knots.detach().contiguous()
        first = torch.searchsorted(detached, detached)
        last = torch.searchsorted(detached, detached, right=True) - 1
        #: For each knot, the middle knot of its run of equal knots: all knots of a run stand
        #: for one point, and the middle one has sat on it longest.
        self.run_middle = (first + last) // 2
        self.origin, self.start, self.slope = self._segments()

    def tie_probability(self) -> torch.Tensor:
        """``(F(x-) + F(x+)) / 2`` at each knot, read at the middle knot of its run."""
        middle = self.run_middle
        return (self.below.gather(1, middle) + self.at_or_below.gather(1, middle)) / 2

    def _segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(origin, start, slope)``, each ``(C, K + 1)``: segment ``j`` holds the values with
        ``j`` knots at or below them, and maps them to ``y = start + (x - origin) * slope``.

        Inside, the line joins ``Phi^-1(F(x_k+))`` and ``Phi^-1(F(x_k+1 -))``: linear in the
        probit scale, exact for a Gaussian channel, where linear interpolation of ``F`` itself
        would cut every convex tail segment short and shrink the output. The tails continue
        the nearest segment of positive width (slope 0 for a channel whose knots are equal).
        """
        knots, low, high = self.knots, self.low, self.high
        k = knots.shape[1]
        width = knots[:, 1:] - knots[:, :-1]
        inner_slope = _ratio(low[:, 1:] - high[:, :-1], width)
        detached = knots.detach().contiguous()
        inner_lo = torch.searchsorted(detached, detached[:, :1].contiguous(), right=True)
        inner_lo = inner_lo.clamp(max=k - 1)
        inner_hi = (torch.searchsorted(detached, detached[:, -1:].contiguous()) - 1).clamp(min=0)
        low_slope = _ratio(
            low.gather(1, inner_lo) - high[:, :1], knots.gather(1, inner_lo) - knots[:, :1]
        )
        high_slope = _ratio(
            low[:, -1:] - high.gather(1, inner_hi), knots[:, -1:] - knots.gather(1, inner_hi)
        )
        origin = torch.cat([knots[:, :1], knots], dim=1)
        start = torch.cat([low[:, :1], high], dim=1)
        slope = torch.cat([low_slope, inner_slope, high_slope], dim=1)
        return origin, start, slope

    def probit_limits(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Phi^-1(F(t-))`` and ``Phi^-1(F(t+))`` at ``points`` ``(C, m)``, differentiable in
        the knots: the segment lines, and the two limits where a point sits on a knot."""
        knots = self.knots.detach().contiguous()
        points_c = points.detach().contiguous()
        segment = torch.searchsorted(knots, points_c, right=True)
        origin = self.origin.gather(1, segment)
        inside = self.start.gather(1, segment) + (points - origin) * self.slope.gather(1, segment)
        tied = (segment > 0) & (points == origin)  # on the last knot of a run: segment - 1
        middle = self.run_middle.gather(1, (segment - 1).clamp(min=0))
        lower = torch.where(tied, self.low.gather(1, middle), inside)
        upper = torch.where(tied, self.high.gather(1, middle), inside)
        return lower, upper

    def cdf_limits(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F(t-)`` and ``F(t+)`` at ``points``: :meth:`probit_limits` as probabilities."""
        lower, upper = self.probit_limits(points)
        return torch.special.ndtr(lower), torch.special.ndtr(upper)

    def lookup(self, cells: int) -> Lookup:
        """The transform tabulated for :func:`lookup_transform` (see :class:`Lookup`).

        ``cells`` equal cells span the outer knots; each holds the line from the transform's
        value just after its left edge to the value just before its right edge (so the table
        equals the transform at every cell edge and interpolates it linearly in between). Rows
        0 and ``cells + 1`` are the two tails. Runs of tied knots (atoms) become the atom list.
        Intercepts and slopes are differentiable in the knots.
        """
        knots = self.knots
        channels = knots.shape[0]
        lowest, highest = knots[:, 0], knots[:, -1]
        width = (highest - lowest) / cells
        steps = torch.arange(cells + 1, dtype=knots.dtype, device=knots.device)
        edges = lowest.unsqueeze(1) + width.unsqueeze(1) * steps
        left, right = self.probit_limits(edges)
        cell_slope = _ratio(left[:, 1:] - right[:, :-1], width.unsqueeze(1).expand(-1, cells))
        origin = torch.cat([lowest.unsqueeze(1), edges[:, :-1], highest.unsqueeze(1)], dim=1)
        start = torch.cat([self.low[:, :1], right[:, :-1], self.high[:, -1:]], dim=1)
        slope = torch.cat([self.slope[:, :1], cell_slope, self.slope[:, -1:]], dim=1)
        detached = knots.detach()
        new_value = torch.ones_like(detached, dtype=torch.bool)
        new_value[:, 1:] = detached[:, 1:] != detached[:, :-1]
        atom_starts = in_tie_run(detached) & new_value
        count = int(atom_starts.sum(dim=1).max())
        order = atom_starts.new_zeros(channels, 0, dtype=torch.long)
        if count:  # each channel's atoms first, in order
            order = torch.argsort((~atom_starts).to(torch.int8), dim=1, stable=True)[:, :count]
        tiny = torch.finfo(knots.dtype).tiny
        offsets = torch.arange(channels, device=knots.device, dtype=knots.dtype) * (cells + 2)
        return Lookup(
            lowest=lowest.detach(),
            scale=torch.where(width > 0, 1.0 / width.clamp_min(tiny), 1.0 / tiny).detach(),
            first_row=offsets,
            last_row=offsets + (cells + 1),
            intercept=(start - origin * slope).reshape(-1),
            slope=slope.reshape(-1),
            atoms=torch.where(atom_starts, detached, float("nan")).gather(1, order),
            tie_values=_probit(self.tie_probability(), self.delta).detach().gather(1, order),
            limit=-float(torch.special.ndtri(torch.tensor(self.delta, dtype=torch.float64))),
        )


def _ratio(rise: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """``rise / run`` where ``run > 0``, else 0 (a segment of tied knots has no slope)."""
    positive = run > 0
    return torch.where(positive, rise / torch.where(positive, run, 1.0), 0.0)


class Lookup(NamedTuple):
    """The transform of a :class:`KnotTable` as a per-channel lookup table.

    A value ``x`` of channel ``c`` reads row ``r = first_row_c + clamp(1 + floor((x -
    lowest_c) * scale_c), 0, cells + 1)`` of ``intercept`` and ``slope`` and becomes
    ``y = clip(intercept_r + x * slope_r, -limit, limit)``, except that a value equal to one of
    the channel's ``atoms`` becomes that atom's mid-p value in ``tie_values``. One index, two
    reads and one multiply-add per value, instead of a binary search among the knots.
    """

    lowest: torch.Tensor
    scale: torch.Tensor
    first_row: torch.Tensor
    last_row: torch.Tensor
    intercept: torch.Tensor
    slope: torch.Tensor
    atoms: torch.Tensor
    tie_values: torch.Tensor
    limit: float


def lookup_transform(x: torch.Tensor, lookup: Lookup, layout: Layout) -> torch.Tensor:
    """``y`` of ``x`` (``layout``, compute dtype) through ``lookup``; differentiable in ``x``
    and in the lookup's intercepts and slopes."""
    shape = layout.channel_shape(lookup.lowest.shape[0])

    def per_channel(values: torch.Tensor) -> torch.Tensor:
        return values.to(x.dtype).reshape(shape)

    with torch.no_grad():  # the row index carries no gradient
        shift = lookup.first_row + 1 - lookup.lowest * lookup.scale
        position = torch.addcmul(per_channel(shift), x, per_channel(lookup.scale))
        first, last = per_channel(lookup.first_row), per_channel(lookup.last_row)
        index = position.clamp_(first, last).to(torch.long)
        index = index.clamp_(first.to(torch.long), last.to(torch.long))  # NaN inputs
    ties = None
    for column in range(lookup.atoms.shape[1]):
        tie = x == per_channel(lookup.atoms[:, column])
        ties = tie if ties is None else ties | tie
    y = _TableLookup.apply(
        x, index, lookup.intercept.to(x.dtype), lookup.slope.to(x.dtype), ties, lookup.limit
    )
    for column in range(lookup.atoms.shape[1]):
        value = per_channel(lookup.tie_values[:, column])
        y = torch.where(x == per_channel(lookup.atoms[:, column]), value, y)
    return y


class _TableLookup(torch.autograd.Function):
    """``y = clip(intercept[index] + x * slope[index], -limit, limit)``, backward by hand.

    Backward, ``g`` the upstream gradient, 0 where ``y`` was clipped or ``x`` is an atom::

        dL/dx = g * slope[index],   dL/dintercept_r = sum g,   dL/dslope_r = sum g * x

    summed over the values that read row ``r`` (two ``scatter_add_``). The row index is
    piecewise constant in everything, so it carries no gradient; intercepts and slopes are
    differentiable functions of the knots, and autograd finishes the chain.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: torch.Tensor,
        index: torch.Tensor,
        intercept: torch.Tensor,
        slope: torch.Tensor,
        ties: torch.Tensor | None,
        limit: float,
    ) -> torch.Tensor:
        slopes = slope.take(index)
        y = torch.addcmul(intercept.take(index), x, slopes).clamp_(-limit, limit)
        ctx.save_for_backward(x, index, slopes, y, ties)
        ctx.limit, ctx.rows = limit, slope.shape[0]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, index, slopes, y, ties = ctx.saved_tensors
        keep = y.abs() < ctx.limit
        if ties is not None:
            keep &= ~ties
        through = grad * keep
        flat = index.reshape(-1)
        grad_intercept = through.new_zeros(ctx.rows).scatter_add_(0, flat, through.reshape(-1))
        grad_slope = through.new_zeros(ctx.rows).scatter_add_(0, flat, (through * x).reshape(-1))
        return through.mul_(slopes), None, grad_intercept, grad_slope, None, None


def in_tie_run(knots: torch.Tensor) -> torch.Tensor:
    """Knots equal to a neighbour: on an atom, a value the data take many times."""
    equal = knots[:, 1:] == knots[:, :-1]
    false = torch.zeros_like(equal[:, :1])
    return torch.cat([equal, false], dim=1) | torch.cat([false, equal], dim=1)


def sample_table(sorted_sample: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fractions of the sorted sample ``(C, m)`` below and at or below ``points`` ``(C, K)``."""
    m = sorted_sample.shape[1]
    sorted_sample, points = sorted_sample.contiguous(), points.contiguous()
    below = torch.searchsorted(sorted_sample, points).to(sorted_sample.dtype) / m
    at_or_below = torch.searchsorted(sorted_sample, points, right=True).to(sorted_sample.dtype) / m
    return below, at_or_below


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
        num_knots: int = 64,
        sample_size: int = 4096,
        delta: float = 1e-6,
        momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        self._eval_cache: dict[torch.dtype, Lookup] = {}
        super().__init__(num_features, layout, 1e-5, momentum, affine)
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
            check_batch_size(x, NAME, self.layout)
            n = layout.values_per_channel(x)
            sorted_sample = sort_rows(knot_sample(values, layout, self.sample_size))
            knots = slice_means(sorted_sample, self.num_knots)
            below, at_or_below = sample_table(sorted_sample.detach(), knots.detach())
            table = KnotTable(knots, below, at_or_below, max(self.delta, 0.5 / n))
            self._update_running_stats(knots.detach(), sorted_sample.detach())
            # a table finer than the batch costs more to build than it saves
            cells = min(self.cells, max(4 * self.num_knots, n // 8))
            lookup = table.lookup(cells)
        else:
            lookup = self._eval_lookup(values.dtype)
        y = lookup_transform(values, lookup, layout)
        return self.affine_transform(y).to(x.dtype)

    def _eval_lookup(self, dtype: torch.dtype) -> Lookup:
        """The running table's lookup, built once per dtype until the statistics change."""
        if dtype not in self._eval_cache:
            table = KnotTable(
                self.running_knots.to(dtype),
                self.running_below.to(dtype),
                self.running_at_or_below.to(dtype),
                self.delta,
            )
            self._eval_cache[dtype] = table.lookup(self.cells)
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
    Option("delta", float, 1e-6, "clip F to [delta, 1-delta]; train: >= 1/(2n)", 1e-6, 0.25),
    MOMENTUM,
    AFFINE,
)


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=NAME,
            summary="probability integral transform: Phi^-1 of a piecewise-linear empirical CDF",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=PIT,
            options=OPTIONS,
            version="2",
            reference="Ioffe & Szegedy, ICML 2015 (running statistics); Parzen, Nonparametric "
            "statistical data modeling, JASA 1979 (mid-p quantile/distribution functions); "
            "Lancaster, Significance tests in discrete distributions, JASA 1961 (mid-p)",
        )
    )
