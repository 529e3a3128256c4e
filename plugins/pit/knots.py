"""The knots of a channel's distribution: the sorted sample they come from, their slice means,
and the fractions of a sample below and at or below them."""

from __future__ import annotations

import numpy as np
import torch

from normzoo.layouts import Layout
from normzoo_plugins.pit.kernel import searchsorted


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
    means = torch.where(flat, lo[:, :-1], means).to(sorted_rows.dtype)
    # next to a run of ties, rounding can leave a mean an ulp above the run's exact value: the
    # knots must be sorted for the searches that place them
    return means.cummax(dim=1).values


def knot_sample(x: torch.Tensor, layout: Layout, sample_size: int) -> torch.Tensor:
    """The values of ``x`` the knots are estimated from, as ``(C, m)``: all of them, or about
    ``sample_size`` per channel taken at an even stride, copying only those."""
    n = layout.values_per_channel(x) if x.numel() else 0
    stride = max(1, -(-n // sample_size))
    if layout.channels_last or x.dim() == 2:
        return x.reshape(-1, x.shape[-1])[::stride].t()
    grouped = x.flatten(2)  # (N, C, positions)
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


def in_tie_run(knots: torch.Tensor) -> torch.Tensor:
    """Knots equal to a neighbour: on an atom, a value the data take many times."""
    equal = knots[:, 1:] == knots[:, :-1]
    false = torch.zeros_like(equal[:, :1])
    return torch.cat([equal, false], dim=1) | torch.cat([false, equal], dim=1)


def sample_table(sorted_sample: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fractions of the sorted sample ``(C, m)`` below and at or below ``points`` ``(C, K)``
    (sorted within each row)."""
    m = sorted_sample.shape[1]
    below = searchsorted(sorted_sample, points).to(sorted_sample.dtype) / m
    at_or_below = searchsorted(sorted_sample, points, right=True).to(sorted_sample.dtype) / m
    return below, at_or_below
