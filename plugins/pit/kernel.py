"""Fused CPU loops (numba) for the two places where torch operations cost ``pit`` the most:
the per-value table lookup, forward and backward, and searches of sorted rows.

**The lookup.** Written with torch operations (the reference, and the path on other devices
and dtypes: :func:`~normzoo_plugins.pit.table.lookup_transform`), a lookup makes about ten
passes over the values (row index, clamps, two gathers, a multiply-add, the clip, the atoms)
and keeps an int64 row index, the slopes, the output and a tie mask for the backward. Here the
forward is one pass, and the backward recomputes each value's row from ``x`` (a multiply-add)
instead of keeping it, so only ``x`` is saved. The values are viewed as ``(N, C, P)``: ``P``
positions per example for channels-first layouts, ``P = 1`` for ``fc`` and channels-last ones.
The loops run in parallel over channels; each channel reads and accumulates only its own rows
of the table, so no two threads write the same row.

**The searches.** ``torch.searchsorted`` over a batch of short rows costs about 75 ns per point
on this project's CPU (a hundred channels of 64 knots: half a millisecond), and a training
step of one layer searched nine times. The points ``pit`` searches for are sorted within each
row (knots, cell edges), so one merge pass per row finds them all; other points go to
``torch.searchsorted``.

**Threads.** The parallel loops run on numba's default threading layer: GNU OpenMP where
present (on this project's CPU its ``workqueue`` layer made a LeNet step with ``pit`` about
20% slower). Like torch's own OpenMP loops, it is not fork-safe: a child forked from a process
that ran one hangs or dies in the next parallel loop, numba's or torch's, so processes that
train are started with ``spawn`` (as ``normzoo compare`` and ``--nproc`` do). A lock lets one
parallel loop run at a time, which the ``workqueue`` layer (numba's fallback where OpenMP is
missing) needs when several Python threads call ``pit``. Without numba, :func:`supports` is
false and torch operations do all the work.

numba sizes its thread pool once, when it is imported: to ``NUMBA_NUM_THREADS``, else the
machine's cores. A pool larger than the process's share of the cores thrashes when other
processes share them (a 1-thread LeNet step with ``pit`` beside two other training processes
on two cores ran 20x slower). So, unless ``NUMBA_NUM_THREADS`` is set, numba is imported with
the variable set to torch's thread count, which every normzoo process launcher sets to the
process's share (:func:`normzoo.harness.group.use_threads` also sets the variable, for a
process that has not imported numba yet). The variable then stays set to the pool's size:
numba reads its configuration again at every compilation and refuses a pool size that
differs from the one it launched (with the variable unset it would read the machine's cores,
and a 1-thread process failed at its second run).

``tests/test_pit.py`` checks both against their torch equivalents.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

_POOL_SIZE = "NUMBA_NUM_THREADS"
if "numba" not in sys.modules:  # imported already: its pool is sized, and the variable with it
    os.environ.setdefault(_POOL_SIZE, str(torch.get_num_threads()))
try:
    import numba
except ImportError:  # pragma: no cover (numba is a dependency; without it torch does the work)
    numba = None
#: The size of numba's pool, fixed when numba was imported.
POOL_THREADS = numba.config.NUMBA_NUM_THREADS if numba is not None else 0
if numba is not None:
    os.environ[_POOL_SIZE] = str(POOL_THREADS)

#: The per-value loops run in parallel over channels; the per-channel ones (tables of a few
#: hundred entries) on one thread, which also compiles several times faster.
_JIT = {"nogil": True, "parallel": True, "cache": True}
_JIT_SMALL = {"nogil": True, "cache": True}
_PARALLEL_LOOP = threading.Lock()


def _njit(*args: Any, **options: Any) -> Any:
    """``numba.njit``, or without numba the plain function (never called: see
    :func:`supports`)."""
    if numba is not None:
        return numba.njit(*args, **options)
    return args[0] if args else (lambda function: function)


@_njit(inline="always")
def _atom(value, atoms, c):  # pragma: no cover (compiled)
    """Which of channel ``c``'s atoms ``value`` equals, or -1."""
    for a in range(atoms.shape[1]):
        if value == atoms[c, a]:
            return a
    return -1


@_njit(inline="always")
def _row(value, scale, shift, low, high):  # pragma: no cover (compiled)
    """The table row ``first + clamp(1 + floor((x - x_1) * scale))`` of ``value``, from the
    channel's ``scale``, ``shift = first + 1 - x_1 * scale`` and row bounds; NaN reads the
    first row (and stays NaN)."""
    position = value * scale + shift
    if not position >= low:
        position = low
    if position > high:
        position = high
    return int(position)


@_njit(**_JIT)
def _forward(x, scale, shift, first, last, intercept, slope, atoms, tie_values, limit, y):
    n, channels, positions = x.shape
    has_atoms = atoms.shape[1] > 0
    for c in numba.prange(channels):
        row_scale, row_shift, low, high = scale[c], shift[c], first[c], last[c]
        for i in range(n):
            for p in range(positions):
                value = x[i, c, p]
                r = _row(value, row_scale, row_shift, low, high)
                out = intercept[r] + value * slope[r]
                if out > limit:
                    out = limit
                elif out < -limit:
                    out = -limit
                y[i, c, p] = out  # NaN stays NaN
                if has_atoms:
                    atom = _atom(value, atoms, c)
                    if atom >= 0:
                        y[i, c, p] = tie_values[c, atom]


@_njit(**_JIT)
def _backward(
    grad, x, scale, shift, first, last, intercept, slope, atoms, limit, grad_x, sums
):  # pragma: no cover (compiled)
    n, channels, positions = x.shape
    has_atoms = atoms.shape[1] > 0
    for c in numba.prange(channels):
        row_scale, row_shift, low, high = scale[c], shift[c], first[c], last[c]
        rows = np.empty(positions, np.int64)
        for i in range(n):
            # two passes per example: the rows and the gradient that passes (no clip, no atom)
            # first, then the accumulation, which keeps the first loop free of memory stalls
            for p in range(positions):
                value = x[i, c, p]
                r = _row(value, row_scale, row_shift, low, high)
                rows[p] = r
                through = grad[i, c, p]
                if not abs(intercept[r] + value * slope[r]) < limit:  # clipped
                    through = 0.0
                if has_atoms and _atom(value, atoms, c) >= 0:  # a tie value is a constant
                    through = 0.0
                grad_x[i, c, p] = through
            for p in range(positions):
                r = rows[p]
                through = grad_x[i, c, p]
                sums[0, r] += through
                sums[1, r] += through * x[i, c, p]
                grad_x[i, c, p] = through * slope[r]


@_njit(**_JIT_SMALL)
def _merge_search(rows, points, right, out):  # pragma: no cover (compiled)
    """False, leaving ``out`` unfinished, at the first point below its predecessor (or NaN)."""
    channels, length = rows.shape
    for c in range(channels):
        j = 0
        for q in range(points.shape[1]):
            point = points[c, q]
            if point != point or (q > 0 and point < points[c, q - 1]):
                return False
            if right:
                while j < length and rows[c, j] <= point:
                    j += 1
            else:
                while j < length and rows[c, j] < point:
                    j += 1
            out[c, q] = j
    return True


@_njit(inline="always")
def _segment_lines(x, low, high):  # pragma: no cover (compiled)
    """One channel's segment lines ``(origin, start, slope)``, each ``K + 1`` long, as
    :meth:`~normzoo_plugins.pit.table.KnotTable._segments` defines them, and the two knots the
    tail slopes are taken to (``inner_lo``, ``inner_hi``)."""
    k = x.shape[0]
    origin = np.empty(k + 1, x.dtype)
    start = np.empty(k + 1, x.dtype)
    slope = np.zeros(k + 1, x.dtype)
    origin[0], start[0] = x[0], low[0]
    for j in range(1, k + 1):
        origin[j], start[j] = x[j - 1], high[j - 1]
    for j in range(1, k):
        if x[j] - x[j - 1] > 0:
            slope[j] = (low[j] - high[j - 1]) / (x[j] - x[j - 1])
    inner_lo = 0
    while inner_lo < k - 1 and x[inner_lo] <= x[0]:
        inner_lo += 1
    inner_hi = k - 1
    while inner_hi > 0 and x[inner_hi] >= x[k - 1]:
        inner_hi -= 1
    if x[inner_lo] - x[0] > 0:
        slope[0] = (low[inner_lo] - high[0]) / (x[inner_lo] - x[0])
    if x[k - 1] - x[inner_hi] > 0:
        slope[k] = (low[k - 1] - high[inner_hi]) / (x[k - 1] - x[inner_hi])
    return origin, start, slope, inner_lo, inner_hi


@_njit(inline="always")
def _edge_limits(x, low, high, middle, width, steps, origin, start, slope):  # pragma: no cover
    """At each cell edge ``e_b = x_1 + b * width``: the number of knots at or below it, whether
    it sits on a knot, and ``Phi^-1(F(e-))``, ``Phi^-1(F(e+))``."""
    k, count = x.shape[0], steps.shape[0]
    segment = np.empty(count, np.int64)
    on_knot = np.zeros(count, np.bool_)
    left = np.empty(count, x.dtype)
    right = np.empty(count, x.dtype)
    s = 0
    for b in range(count):
        edge = x[0] + width * steps[b]
        while s < k and x[s] <= edge:
            s += 1
        segment[b] = s
        if s > 0 and edge == x[s - 1]:
            on_knot[b] = True
            left[b], right[b] = low[middle[s - 1]], high[middle[s - 1]]
        else:
            left[b] = right[b] = start[s] + (edge - origin[s]) * slope[s]
    return segment, on_knot, left, right


@_njit(**_JIT_SMALL)
def _cells_forward(
    knots, low, high, middle, width, steps, intercept, slope
):  # pragma: no cover (compiled)
    channels, k = knots.shape
    cells = steps.shape[0] - 1
    for c in range(channels):
        x, w = knots[c], width[c]
        seg_origin, seg_start, seg_slope, _, _ = _segment_lines(x, low[c], high[c])
        _, _, left, right = _edge_limits(
            x, low[c], high[c], middle[c], w, steps, seg_origin, seg_start, seg_slope
        )
        slope[c, 0] = seg_slope[0]
        intercept[c, 0] = low[c, 0] - x[0] * seg_slope[0]
        for b in range(cells):
            edge = x[0] + w * steps[b]
            cell_slope = (left[b + 1] - right[b]) / w if w > 0 else 0.0
            slope[c, b + 1] = cell_slope
            intercept[c, b + 1] = right[b] - edge * cell_slope
        slope[c, cells + 1] = seg_slope[k]
        intercept[c, cells + 1] = high[c, k - 1] - x[k - 1] * seg_slope[k]


@_njit(**_JIT_SMALL)
def _cells_backward(
    knots, low, high, middle, width, steps, grad_intercept, grad_slope, grad_knots
):  # pragma: no cover (compiled)
    channels, k = knots.shape
    cells = steps.shape[0] - 1
    for c in range(channels):
        x, w, gx = knots[c], width[c], grad_knots[c]
        seg_origin, seg_start, seg_slope, inner_lo, inner_hi = _segment_lines(x, low[c], high[c])
        segment, on_knot, left, right = _edge_limits(
            x, low[c], high[c], middle[c], w, steps, seg_origin, seg_start, seg_slope
        )
        g_seg_slope = np.zeros(k + 1, np.float64)
        g_left = np.zeros(cells + 1, np.float64)
        g_right = np.zeros(cells + 1, np.float64)
        g_edge = np.zeros(cells + 1, np.float64)
        g_width = 0.0
        # intercept = start - origin * slope, row by row
        g_i, g_s = grad_intercept[c, 0], grad_slope[c, 0]
        gx[0] -= g_i * seg_slope[0]
        g_seg_slope[0] += g_s - g_i * x[0]
        g_i, g_s = grad_intercept[c, cells + 1], grad_slope[c, cells + 1]
        gx[k - 1] -= g_i * seg_slope[k]
        g_seg_slope[k] += g_s - g_i * x[k - 1]
        for b in range(cells):
            edge = x[0] + w * steps[b]
            g_i, g_s = grad_intercept[c, b + 1], grad_slope[c, b + 1]
            cell_slope = (left[b + 1] - right[b]) / w if w > 0 else 0.0
            g_right[b] += g_i
            g_edge[b] -= g_i * cell_slope
            g_cell_slope = g_s - g_i * edge
            if w > 0:  # cell_slope = (left[b + 1] - right[b]) / w
                g_left[b + 1] += g_cell_slope / w
                g_right[b] -= g_cell_slope / w
                g_width -= g_cell_slope * (left[b + 1] - right[b]) / (w * w)
        for b in range(cells + 1):
            if not on_knot[b]:  # left = right = start_s + (e - origin_s) slope_s
                s = segment[b]
                g_value = g_left[b] + g_right[b]
                edge = x[0] + w * steps[b]
                g_edge[b] += g_value * seg_slope[s]
                gx[0 if s == 0 else s - 1] -= g_value * seg_slope[s]
                g_seg_slope[s] += g_value * (edge - seg_origin[s])
            gx[0] += g_edge[b]  # e_b = x_1 + width * b
            g_width += g_edge[b] * steps[b]
        gx[k - 1] += g_width / cells  # width = (x_K - x_1) / cells
        gx[0] -= g_width / cells
        for j in range(k + 1):  # slope_j = rise / (x_hi - x_lo), rise constant
            if j == 0:
                lo, hi = 0, inner_lo
            elif j == k:
                lo, hi = inner_hi, k - 1
            else:
                lo, hi = j - 1, j
            run = x[hi] - x[lo]
            if run > 0:
                g_run = -g_seg_slope[j] * seg_slope[j] / run
                gx[hi] += g_run
                gx[lo] -= g_run


def supports(x: torch.Tensor) -> bool:
    """Whether the fused loops handle ``x``: float32 or float64 on the CPU, numba installed,
    and not inside ``torch.compile``, which cannot trace into numba (it compiles the torch
    operations instead)."""
    cpu = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    return cpu and numba is not None and not _compiling()


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing (``torch.compiler.is_compiling`` since torch 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


@contextmanager
def _parallel() -> Iterator[None]:
    """Around a parallel loop: one at a time per process (two Python threads may call ``pit``
    at once), with torch's thread count."""
    with _PARALLEL_LOOP:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), POOL_THREADS)))
        yield


def searchsorted(rows: torch.Tensor, points: torch.Tensor, right: bool = False) -> torch.Tensor:
    """``torch.searchsorted(rows, points, right=right)`` for sorted ``rows`` ``(C, m)`` and
    points ``(C, q)``: one merge pass per row on the CPU when the points are sorted within each
    row, as ``pit``'s are; ``torch.searchsorted`` itself when they are not (or hold a NaN)."""
    if supports(rows) and rows.dtype == points.dtype and rows.dim() == 2:
        out = torch.empty(points.shape, dtype=torch.long)
        merged = _merge_search(
            rows.detach().contiguous().numpy(), points.detach().contiguous().numpy(), right,
            out.numpy(),
        )  # fmt: skip
        if merged:
            return out
    return torch.searchsorted(rows.contiguous(), points.contiguous(), right=right)


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(dtype).contiguous().numpy()


class FusedTable:
    """A :class:`~normzoo_plugins.pit.table.Lookup`'s per-channel constants as numpy arrays of
    the compute dtype, ready for the loops."""

    def __init__(self, lookup, dtype: torch.dtype) -> None:
        channels = lookup.lowest.shape[0]
        self.scale = _numpy(lookup.scale, dtype)
        self.shift = _numpy(lookup.shift, dtype)
        self.first = _numpy(lookup.first_row, dtype)
        self.last = _numpy(lookup.last_row, dtype)
        self.atoms = _numpy(lookup.atoms.reshape(channels, -1), dtype)
        self.tie_values = _numpy(lookup.tie_values.reshape(channels, -1), dtype)
        self.limit = float(lookup.limit)


def forward(
    x: torch.Tensor, table: FusedTable, intercept: torch.Tensor, slope: torch.Tensor
) -> torch.Tensor:
    """``y`` for ``x`` viewed as ``(N, C, P)`` (contiguous)."""
    y = torch.empty_like(x)
    with _parallel():
        _forward(
            x.detach().numpy(), table.scale, table.shift, table.first, table.last,
            intercept.detach().numpy(), slope.detach().numpy(),
            table.atoms, table.tie_values, table.limit, y.numpy(),
        )  # fmt: skip
    return y


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    table: FusedTable,
    intercept: torch.Tensor,
    slope: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients with respect to ``x``, the intercepts and the slopes (the sums over each row's
    values kept in float64)."""
    grad_x = torch.empty_like(x)
    sums = np.zeros((2, intercept.shape[0]), np.float64)
    with _parallel():
        _backward(
            grad.contiguous().numpy(), x.detach().numpy(), table.scale, table.shift,
            table.first, table.last, intercept.detach().numpy(), slope.detach().numpy(),
            table.atoms, table.limit, grad_x.numpy(), sums,
        )  # fmt: skip
    grad_intercept, grad_slope = (torch.from_numpy(s).to(intercept.dtype) for s in sums)
    return grad_x, grad_intercept, grad_slope


def cell_table(
    knots: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    run_middle: torch.Tensor,
    cells: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lookup table's intercepts and slopes ``(C, cells + 2)`` from a knot table
    (``(C, K)``: knots, probit limits, middle knot of each run), differentiable in the knots:
    :meth:`~normzoo_plugins.pit.table.KnotTable.lookup`'s torch operations as one loop per
    channel, with the derivative written out (the limits are counts, constants)."""
    return _CellTable.apply(knots, low.detach(), high.detach(), run_middle, cells)


class _CellTable(torch.autograd.Function):
    """Forward and backward of :func:`cell_table`. The backward follows the forward's chain
    in reverse: each row's ``intercept = start - origin * slope``; the cell slopes
    ``(F-(e_b+1) - F+(e_b)) / width``; the transform at each edge ``e_b = x_1 + b width``, a
    segment line ``start_s + (e - origin_s) slope_s`` unless the edge sits on a knot (then
    constant limits); ``width = (x_K - x_1) / cells``; and the segment slopes
    ``rise / (x_hi - x_lo)`` with constant rises."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        knots: torch.Tensor,
        low: torch.Tensor,
        high: torch.Tensor,
        run_middle: torch.Tensor,
        cells: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = _cell_arrays(knots, low, high, run_middle, cells)
        intercept = knots.new_empty(knots.shape[0], cells + 2)
        slope = torch.empty_like(intercept)
        _cells_forward(*arrays, intercept.numpy(), slope.numpy())
        ctx.arrays = arrays
        return intercept, slope

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_intercept: torch.Tensor, grad_slope: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        knots = ctx.arrays[0]
        grad_knots = np.zeros(knots.shape, np.float64)
        _cells_backward(
            *ctx.arrays, grad_intercept.contiguous().numpy(), grad_slope.contiguous().numpy(),
            grad_knots,
        )  # fmt: skip
        return torch.from_numpy(grad_knots).to(grad_intercept.dtype), None, None, None, None


def _cell_arrays(knots, low, high, run_middle, cells) -> tuple[np.ndarray, ...]:
    dtype = knots.dtype
    width = (knots[:, -1] - knots[:, 0]) / cells
    steps = torch.arange(cells + 1, dtype=dtype)
    return (
        _numpy(knots, dtype), _numpy(low, dtype), _numpy(high, dtype),
        run_middle.contiguous().numpy(), _numpy(width, dtype), steps.numpy(),
    )  # fmt: skip
