"""The knot table both modes transform with, and its per-value form: a lookup table with a
hand-written backward."""

from __future__ import annotations

from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from normzoo.layouts import Layout
from normzoo_plugins.pit import kernel
from normzoo_plugins.pit.knots import in_tie_run


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
        detached = knots.detach()
        first = kernel.searchsorted(detached, detached)
        last = kernel.searchsorted(detached, detached, right=True) - 1
        #: For each knot, the middle knot of its run of equal knots: all knots of a run stand
        #: for one point, and the middle one has sat on it longest.
        self.run_middle = (first + last) // 2

    @cached_property
    def _lines(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._segments()

    @property
    def origin(self) -> torch.Tensor:
        """Each segment's origin ``(C, K + 1)`` (see :meth:`_segments`)."""
        return self._lines[0]

    @property
    def start(self) -> torch.Tensor:
        """Each segment's value at its origin ``(C, K + 1)``."""
        return self._lines[1]

    @property
    def slope(self) -> torch.Tensor:
        """Each segment's slope ``(C, K + 1)``."""
        return self._lines[2]

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
        detached = knots.detach()
        inner_lo = kernel.searchsorted(detached, detached[:, :1], right=True).clamp(max=k - 1)
        inner_hi = (kernel.searchsorted(detached, detached[:, -1:]) - 1).clamp(min=0)
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
        """``Phi^-1(F(t-))`` and ``Phi^-1(F(t+))`` at ``points`` ``(C, m)``, sorted within each
        row, differentiable in the knots: the segment lines, and the two limits where a point
        sits on a knot."""
        segment = kernel.searchsorted(self.knots.detach(), points.detach(), right=True)
        origin = self.origin.gather(1, segment)
        inside = self.start.gather(1, segment) + (points - origin) * self.slope.gather(1, segment)
        tied = (segment > 0) & (points == origin)  # on the last knot of a run: segment - 1
        middle = self.run_middle.gather(1, (segment - 1).clamp(min=0))
        lower = torch.where(tied, self.low.gather(1, middle), inside)
        upper = torch.where(tied, self.high.gather(1, middle), inside)
        return lower, upper

    def cdf_limits(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F(t-)`` and ``F(t+)`` at ``points`` (sorted within each row): :meth:`probit_limits`
        as probabilities."""
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
        if kernel.supports(knots):
            intercept, slope = kernel.cell_table(knots, self.low, self.high, self.run_middle, cells)
        else:
            intercept, slope = self._cell_table(cells)
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
        scale = torch.where(width > 0, 1.0 / width.clamp_min(tiny), 1.0 / tiny).detach()
        return Lookup(
            lowest=lowest.detach(),
            scale=scale,
            shift=offsets + 1 - lowest.detach() * scale,
            first_row=offsets,
            last_row=offsets + (cells + 1),
            intercept=intercept.reshape(-1),
            slope=slope.reshape(-1),
            atoms=torch.where(atom_starts, detached, float("nan")).gather(1, order),
            tie_values=_probit(self.tie_probability(), self.delta).detach().gather(1, order),
            limit=-float(torch.special.ndtri(torch.tensor(self.delta, dtype=torch.float64))),
        )

    def _cell_table(self, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Intercepts and slopes ``(C, cells + 2)`` of :meth:`lookup`'s rows, with torch
        operations (autograd differentiates them); :func:`kernel.cell_table` is the same on the
        CPU."""
        knots = self.knots
        lowest, highest = knots[:, 0], knots[:, -1]
        width = (highest - lowest) / cells
        steps = torch.arange(cells + 1, dtype=knots.dtype, device=knots.device)
        edges = lowest.unsqueeze(1) + width.unsqueeze(1) * steps
        left, right = self.probit_limits(edges)
        cell_slope = _ratio(left[:, 1:] - right[:, :-1], width.unsqueeze(1).expand(-1, cells))
        origin = torch.cat([lowest.unsqueeze(1), edges[:, :-1], highest.unsqueeze(1)], dim=1)
        start = torch.cat([self.low[:, :1], right[:, :-1], self.high[:, -1:]], dim=1)
        slope = torch.cat([self.slope[:, :1], cell_slope, self.slope[:, -1:]], dim=1)
        return start - origin * slope, slope


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
    #: ``first_row + 1 - lowest * scale``: the row is ``floor(x * scale + shift)``, clamped
    shift: torch.Tensor
    first_row: torch.Tensor
    last_row: torch.Tensor
    intercept: torch.Tensor
    slope: torch.Tensor
    atoms: torch.Tensor
    tie_values: torch.Tensor
    limit: float


def lookup_transform(
    x: torch.Tensor, lookup: Lookup, layout: Layout, fused: kernel.FusedTable | None = None
) -> torch.Tensor:
    """``y`` of ``x`` (``layout``, compute dtype) through ``lookup``; differentiable in ``x``
    and in the lookup's intercepts and slopes.

    On the CPU (float32, float64) one fused loop per direction does the work
    (:mod:`~normzoo_plugins.pit.kernel`; ``fused`` is its form of the table, built here when not
    given); elsewhere the torch operations below compute the same function.
    """
    intercept, slope = lookup.intercept.to(x.dtype), lookup.slope.to(x.dtype)
    if kernel.supports(x):
        channels = lookup.lowest.shape[0]
        rows_last = layout.channels_last or x.dim() == 2
        values = x.reshape(-1, channels, 1) if rows_last else x.flatten(2)
        fused = fused or kernel.FusedTable(lookup, x.dtype)
        return _FusedLookup.apply(values.contiguous(), intercept, slope, fused).view(x.shape)
    shape = layout.channel_shape(lookup.lowest.shape[0])

    def per_channel(values: torch.Tensor) -> torch.Tensor:
        return values.to(x.dtype).reshape(shape)

    with torch.no_grad():  # the row index carries no gradient
        position = torch.addcmul(per_channel(lookup.shift), x, per_channel(lookup.scale))
        first, last = per_channel(lookup.first_row), per_channel(lookup.last_row)
        index = position.clamp_(first, last).to(torch.long)
        index = index.clamp_(first.to(torch.long), last.to(torch.long))  # NaN inputs
    ties = None
    for column in range(lookup.atoms.shape[1]):
        tie = x == per_channel(lookup.atoms[:, column])
        ties = tie if ties is None else ties | tie
    y = _TableLookup.apply(x, index, intercept, slope, ties, lookup.limit)
    for column in range(lookup.atoms.shape[1]):
        value = per_channel(lookup.tie_values[:, column])
        y = torch.where(x == per_channel(lookup.atoms[:, column]), value, y)
    return y


class _FusedLookup(torch.autograd.Function):
    """:class:`_TableLookup`'s function and gradients, computed by the fused CPU loops; only
    the input is kept for the backward, which recomputes each value's row."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        values: torch.Tensor,
        intercept: torch.Tensor,
        slope: torch.Tensor,
        fused: kernel.FusedTable,
    ) -> torch.Tensor:
        ctx.save_for_backward(values)
        # the table rides on ctx, not in saved_tensors: a cached eval table may have been built
        # under torch.inference_mode, and inference tensors cannot be saved for backward
        ctx.fused, ctx.intercept, ctx.slope = fused, intercept.detach(), slope.detach()
        return kernel.forward(values, fused, intercept, slope)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (values,) = ctx.saved_tensors
        return (*kernel.backward(grad, values, ctx.fused, ctx.intercept, ctx.slope), None)


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
