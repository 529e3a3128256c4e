"""Probability integral transform (PIT) normalization: ``y = Phi^-1(F(x))`` per channel.

``F`` is the distribution function of the channel's values, ``Phi`` the standard normal one: every
channel comes out standard normal whatever its distribution. (With a Gaussian ``F`` fitted by
mean and variance the transform is plain standardization; here ``F`` is empirical.) A
per-channel affine ``weight * y + bias`` follows. Train mode uses the batch (``N`` values per
channel for ``fc``, ``N * H * W`` for ``conv``), eval mode running statistics.

Train mode, per channel with ``n`` values, ``K = num_knots``, ``c = bandwidth``::

    z    = (x - mean) / sqrt(var + eps)            batch mean and biased variance
    q_k  = K * integral of Q(u), (k-1)/K..k/K      anchors: slice means of the quantile function
    h_k  = max(c * (q_{k+1} - q_{k-1}) / 2, 0.03)  "adaptive" (one-sided gap at both ends)
    F(z) = mean_k Phi((z - q_k) / h_k)             kernel CDF over the K anchors
    y    = Phi^-1(clip(F(z), d, 1 - d)),           d = max(delta, 1 / (2 n))

``Q`` interpolates the sorted ``z`` linearly (numpy's quantile), so ``q_k`` is the mean of the
``k``-th ``1/K`` of the sorted values: a smoothed quantile near ``p_k = (k - 0.5) / K`` whose
gradient spreads over ``n / K`` values instead of landing on one order statistic. Hard ranks
have zero gradient almost everywhere; the kernel CDF is smooth. Each anchor is smoothed over its
local gap, so ``F`` follows the empirical CDF where the data are dense and where they are sparse
alike (a variable kernel, Silverman 1986, 5.3); the width floor turns runs of tied anchors into
steps 0.03 standard deviations wide. ``smoothing="fixed"`` uses Silverman's rule
``h = c * 1.06 * K**(-1/5)`` (``sigma = 1``: ``z`` is standardized) for every anchor and
compares ``z * sqrt(1 + h**2)`` with the anchors, which removes the variance ``h**2`` that
smoothing adds (the shrunk smoothed bootstrap, Silverman 1986, 6.4): smoother gradients, but
skewed or multimodal channels come out blurred. The anchors are *not* detached: autograd
differentiates the sort, so the gradient is that of the function computed (float64 gradcheck
passes) and the invariances of the output carry over to it.

Tails: float32 cannot tell ``1 - 1e-7`` from 1, so values above the median anchor use the
complementary sum ``1 - F = mean_k Phi((q_k - z) / h_k)``, computed directly, and
``y = -Phi^-1(1 - F)``. Each value pays for the one sum of its own tail, at most about 0.5,
which keeps full relative precision. The ``(n, K)`` kernel matrix is never held whole: a custom
autograd function sums it in chunks and recomputes it in backward, so the cost is ``O(n K)``
time and ``O(n + K)`` saved memory per channel, plus one ``O(n log n)`` sort.

``smoothing="hard"`` is ``y = Phi^-1((rank - 0.5) / n)`` with average ranks for ties (same
clipping, same complementary upper half). Its input gradient is zero: it is a reference.

Eval mode uses ``running_mean``, ``running_var`` (unbiased, as torch) and ``running_knots``: per
channel an exponential average of the batch quantiles of ``z`` at ``p_k`` (a cumulative max keeps
them non-decreasing), initialised to ``Phi^-1(p_k)`` so that an untrained module standardizes. With
``z`` standardized by the running moments, ``F`` interpolates ``(knot_k, p_k)`` linearly (``1 - F``
interpolates ``(knot_k, 1 - p_k)``). Beyond the outer knots the tail is Gaussian, linear in the
probit scale with the slope of the outer segment, e.g. below ``knot_1``::

    y = Phi^-1(p_1) + (z - knot_1) * (Phi^-1(p_2) - Phi^-1(p_1)) / (knot_2 - knot_1)

and ``y`` is clipped to ``+-Phi^-1(1 - delta)``, i.e. ``F`` to ``[delta, 1 - delta]``. Running
averages follow torch: ``running = (1 - momentum) * running + momentum * batch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from normzoo.base import NormBase
from normzoo.hookspecs import hookimpl
from normzoo.interface import (
    AFFINE,
    EPS,
    MOMENTUM,
    NormInfo,
    Option,
    check_batch_size,
    check_input,
)
from normzoo.layouts import LAYOUT_NAMES
from normzoo.stats import batch_moments, unbiased, upcast

NAME = "pit"
SMOOTHINGS = ("adaptive", "fixed", "hard")
#: Smallest adaptive kernel width, in standard deviations: the width of tied anchors.
MIN_WIDTH = 0.03
#: Elements of one ``(C, chunk, K)`` block of the kernel matrix (4 MiB in float32).
CHUNK_ELEMENTS = 1 << 20
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_CUT = 150.0  # w^2 beyond which the kernel density counts as 0 (exp(-75) ~ 3e-33)
_EXP_CUT = math.exp(-_CUT / 2)


def knot_probabilities(num_knots: int) -> torch.Tensor:
    """``p_k = (k - 0.5) / K`` for ``k = 1..K``, in float64."""
    return (torch.arange(num_knots, dtype=torch.float64) + 0.5) / num_knots


def row_quantiles(sorted_rows: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Quantiles of each row of ``sorted_rows`` ``(C, n)`` at ``probs`` ``(K,)``: ``(C, K)``.

    Linear interpolation between order statistics at position ``p * (n - 1)``, numpy's default
    ("linear", Hyndman & Fan type 7). Differentiable in the sorted values.
    """
    n = sorted_rows.shape[1]
    pos = probs.to(torch.float64) * (n - 1)
    floor = pos.floor().clamp(max=n - 1)
    frac = (pos - floor).to(sorted_rows)
    lo = floor.long().to(sorted_rows.device)
    hi = (lo + 1).clamp(max=n - 1)
    return sorted_rows[:, lo] * (1 - frac) + sorted_rows[:, hi] * frac


def slice_means(sorted_rows: torch.Tensor, num_slices: int) -> torch.Tensor:
    """``K`` slice means ``K * integral of Q(u) over [(k-1)/K, k/K]`` per row: ``(C, K)``.

    ``Q`` is the quantile function :func:`row_quantiles` interpolates, linear between order
    statistics, so its integral is a running sum of trapezoids (kept in float64). Each mean
    averages about ``n / K`` order statistics: its gradient spreads evenly over them.
    """
    c, n = sorted_rows.shape
    s = sorted_rows.to(torch.float64)
    running = torch.cat([s.new_zeros(c, 1), ((s[:, 1:] + s[:, :-1]) / 2).cumsum(dim=1)], dim=1)
    x = torch.arange(num_slices + 1, dtype=torch.float64) * ((n - 1) / num_slices)
    j = x.floor().long().clamp(max=n - 2)
    f = (x - j).to(s.device)
    j = j.to(s.device)
    lo, hi = s[:, j], s[:, j + 1]
    integral = running[:, j] + f * lo + (f * f / 2) * (hi - lo)
    return ((integral[:, 1:] - integral[:, :-1]) * (num_slices / (n - 1))).to(sorted_rows.dtype)


def average_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..n`` along each row of ``(C, n)``, ties sharing their average rank."""
    sorted_rows, order = rows.sort(dim=1)
    n = rows.shape[1]
    pos = torch.arange(n, device=rows.device).expand_as(order)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(dim=1).values
    last = torch.where(ends, pos, n - 1).flip(1).cummin(dim=1).values.flip(1)
    average = (first + last).to(rows.dtype) / 2 + 1
    return torch.empty_like(rows).scatter_(1, order, average)


def hard_pit(rows: torch.Tensor, delta: float) -> torch.Tensor:
    """``Phi^-1((rank - 0.5) / n)`` per row, upper half from ``(n - rank + 0.5) / n``."""
    n = rows.shape[1]
    rank = average_ranks(rows)
    lower, upper = (rank - 0.5) / n, (n - rank + 0.5) / n
    return _probit(lower, upper, lower <= upper, delta)


def _probit(
    lower: torch.Tensor, upper: torch.Tensor, use_lower: torch.Tensor, delta: float
) -> torch.Tensor:
    """``Phi^-1(u)`` from ``u = lower`` where ``use_lower``, else ``-Phi^-1(1 - u)`` from
    ``1 - u = upper``; the probability is clipped to ``[delta, 1 - delta]`` first."""
    tail = torch.where(use_lower, lower, upper).clamp(delta, 1 - delta)
    return torch.special.ndtri(tail) * (use_lower.to(tail.dtype) * 2 - 1)


class _KernelTail(torch.autograd.Function):
    """``tail_i = mean_k Phi(s_i * w_ik)``, ``w_ik = (t_i - q_k) / h_k``, for rows ``(C, n)``.

    ``s = +1`` gives the kernel CDF ``F``, ``s = -1`` its complement ``1 - F``. Forward and
    backward run over chunks of ``n``; backward recomputes the kernel values::

        d tail_i / d t_i = s_i mean_k phi(w_ik) / h_k
        d tail_i / d q_k = -s_i phi(w_ik) / (K h_k)
        d tail_i / d h_k = -s_i phi(w_ik) w_ik / (K h_k)
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        t: torch.Tensor,
        anchors: torch.Tensor,
        widths: torch.Tensor,
        sign: torch.Tensor,
    ) -> torch.Tensor:
        tail = torch.empty_like(t)
        scale = (-_SQRT_HALF / widths)[:, None, :]
        for part in _chunks(t, anchors.shape[1]):
            # Phi(s w) = erfc(-s w / sqrt 2) / 2: full relative precision in the far tail
            arg = t[:, part, None] - anchors[:, None, :]
            arg.mul_(scale).mul_(sign[:, part, None]).clamp_(max=9.0).erfc_()  # no subnormals
            tail[:, part] = arg.mean(dim=2).mul_(0.5)
        ctx.save_for_backward(t, anchors, widths, sign)
        return tail

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        t, anchors, widths, sign = ctx.saved_tensors
        num_anchors = anchors.shape[1]
        signed = grad * sign
        grad_t = torch.empty_like(t)
        grad_anchors = torch.zeros_like(anchors)
        grad_widths = torch.zeros_like(widths) if ctx.needs_input_grad[2] else None
        inverse = (1.0 / widths)[:, None, :]
        for part in _chunks(t, num_anchors):
            w = (t[:, part, None] - anchors[:, None, :]).mul_(inverse)
            # exp(-w^2/2) - exp(-CUT/2) for w^2 < CUT, else exactly 0: no subnormal floats,
            # which make the products below slower by orders of magnitude on CPUs
            density = w.square().clamp_(max=_CUT).mul_(-0.5).exp_().sub_(_EXP_CUT)
            density.mul_(inverse * _INV_SQRT_2PI)
            grad_t[:, part] = signed[:, part] * density.mean(dim=2)
            row = signed[:, None, part] / num_anchors
            grad_anchors -= torch.bmm(row, density).squeeze(1)
            if grad_widths is not None:
                grad_widths -= torch.bmm(row, density.mul_(w)).squeeze(1)
        return grad_t, grad_anchors, grad_widths, None


def _chunks(t: torch.Tensor, num_anchors: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, t.shape[0] * num_anchors))
    return [slice(start, start + step) for start in range(0, t.shape[1], step)]


def silverman_width(num_anchors: int, bandwidth: float) -> float:
    """Silverman's normal-reference width ``bandwidth * 1.06 * K**(-1/5)`` for ``sigma = 1``."""
    return bandwidth * 1.06 * num_anchors**-0.2


def kernel_widths(anchors: torch.Tensor, smoothing: str, bandwidth: float) -> torch.Tensor:
    """Kernel widths ``h_k`` ``(C, K)`` for anchors ``(C, K)`` of standardized values.

    ``"adaptive"``: ``bandwidth * (q_{k+1} - q_{k-1}) / 2``, one-sided at the two ends, at least
    ``MIN_WIDTH``; differentiable in the anchors. ``"fixed"``: ``bandwidth * 1.06 * K**(-1/5)``.
    """
    if smoothing == "fixed":
        return anchors.new_full(anchors.shape, silverman_width(anchors.shape[1], bandwidth))
    gaps = anchors[:, 1:] - anchors[:, :-1]
    spacing = torch.cat([gaps[:, :1], (gaps[:, 1:] + gaps[:, :-1]) / 2, gaps[:, -1:]], dim=1)
    return (bandwidth * spacing).clamp_min(MIN_WIDTH)


def kernel_pit(
    z: torch.Tensor, anchors: torch.Tensor, smoothing: str, bandwidth: float, delta: float
) -> torch.Tensor:
    """Smooth PIT of standardized rows ``z`` ``(C, n)`` against their anchors ``(C, K)``."""
    widths = kernel_widths(anchors, smoothing, bandwidth)
    k = anchors.shape[1]
    t = z
    if smoothing == "fixed":  # undo the variance h**2 that smoothing adds
        t = z * math.sqrt(1.0 + silverman_width(k, bandwidth) ** 2)
    pivot = anchors[:, (k - 1) // 2 : k // 2 + 1].mean(dim=1, keepdim=True).detach()
    use_lower = t <= pivot
    tail = _KernelTail.apply(t, anchors, widths, use_lower.to(t.dtype) * 2 - 1)
    return _probit(tail, tail, use_lower, delta)


def knot_pit(z: torch.Tensor, knots: torch.Tensor, delta: float) -> torch.Tensor:
    """Eval PIT of rows ``z`` ``(C, n)``: piecewise-linear CDF through ``knots`` ``(C, K)``.

    Inside the knots ``u = interp(z, knots, p)`` and ``1 - u = interp(z, knots, 1 - p)``;
    outside, the Gaussian tail of the outer segment. Segments narrower than the dtype's epsilon
    (tied knots) count as that wide, so that every slope stays finite.
    """
    k = knots.shape[1]
    p64 = knot_probabilities(k)
    p, p_up, y_knots = p64.to(z), (1 - p64).to(z), torch.special.ndtri(p64).to(z)
    width = (knots[:, 1:] - knots[:, :-1]).clamp_min(torch.finfo(z.dtype).eps)
    segment = torch.searchsorted(knots.contiguous(), z.contiguous(), right=True)
    segment = (segment - 1).clamp(0, k - 2)
    frac = ((z - knots.gather(1, segment)) / width.gather(1, segment)).clamp(0, 1)
    lower = torch.lerp(p[segment], p[segment + 1], frac)
    upper = torch.lerp(p_up[segment], p_up[segment + 1], frac)
    inside = _probit(lower, upper, lower <= upper, delta)
    below = y_knots[0] + (z - knots[:, :1]) * ((y_knots[1] - y_knots[0]) / width[:, :1])
    above = y_knots[-1] + (z - knots[:, -1:]) * ((y_knots[-1] - y_knots[-2]) / width[:, -1:])
    y = torch.where(z < knots[:, :1], below, torch.where(z > knots[:, -1:], above, inside))
    limit = -float(torch.special.ndtri(torch.tensor(delta, dtype=torch.float64)))
    return y.clamp(-limit, limit)


def _initial_knots(num_features: int, num_knots: int) -> torch.Tensor:
    """``Phi^-1(p_k)`` for every channel: an untrained module standardizes."""
    knots = torch.special.ndtri(knot_probabilities(num_knots)).to(torch.float32)
    return knots.expand(num_features, -1).clone()


class PIT(NormBase):
    """Probability integral transform normalization; the statistics live in registered buffers.

    Parameters
    ----------
    num_features, layout, eps, momentum, affine:
        As for :class:`~normzoo.NormBase`.
    num_knots:
        ``K``: quantile anchors of the train-mode kernel CDF and running knots of eval mode.
    smoothing:
        Train-mode CDF: ``"adaptive"`` or ``"fixed"`` kernel width, or ``"hard"`` ranks.
    bandwidth:
        Multiplies the kernel widths: the local quantile gap, or Silverman's ``1.06 K**(-1/5)``.
    delta:
        Probabilities are clipped to ``[delta, 1 - delta]`` (train: ``max(delta, 1/(2n))``).

    float16 and bfloat16 inputs are transformed in float32 (``ndtri`` has no half kernels).
    """

    def __init__(
        self,
        num_features: int,
        layout: str,
        num_knots: int = 32,
        smoothing: str = "adaptive",
        bandwidth: float = 1.0,
        delta: float = 1e-6,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
    ) -> None:
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"{NAME}: smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
        super().__init__(num_features, layout, eps, momentum, affine)
        self.num_knots = num_knots
        self.smoothing = smoothing
        self.bandwidth = bandwidth
        self.delta = delta
        self.register_running_stat("running_mean", partial(torch.zeros, num_features))
        self.register_running_stat("running_var", partial(torch.ones, num_features))
        knots = partial(_initial_knots, num_features, num_knots)
        self.register_running_stat("running_knots", knots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, NAME)
        layout = self.layout_spec
        xc = upcast(x)
        if self.training:
            check_batch_size(x, NAME, self.layout)
            n = layout.values_per_channel(x)
            delta = max(self.delta, 0.5 / n)
            mean, var = batch_moments(xc, layout)
            z = layout.to_channel_matrix((xc - mean) / torch.sqrt(var + self.eps))
            sorted_z = z.sort(dim=1).values
            quantiles = row_quantiles(sorted_z.detach(), knot_probabilities(self.num_knots))
            self._update_running_stats(mean.reshape(-1), var.reshape(-1), quantiles, n)
            if self.smoothing == "hard":
                y = hard_pit(layout.to_channel_matrix(xc.detach()), delta)
            else:
                anchors = slice_means(sorted_z, self.num_knots)
                y = kernel_pit(z, anchors, self.smoothing, self.bandwidth, delta)
        else:
            shape = layout.channel_shape(self.num_features)
            mean = self.running_mean.to(xc.dtype).reshape(shape)
            var = self.running_var.to(xc.dtype).reshape(shape)
            z = layout.to_channel_matrix((xc - mean) / torch.sqrt(var + self.eps))
            y = knot_pit(z, self.running_knots.to(z.dtype), self.delta)
        y = layout.from_channel_matrix(y, x)
        return self.affine_transform(y).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, quantiles: torch.Tensor, count: int
    ) -> None:
        self.update_running_stats(
            running_mean=mean, running_var=unbiased(var, count), running_knots=quantiles
        )
        self.running_knots.copy_(self.running_knots.cummax(dim=1).values)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_knots={self.num_knots}, smoothing={self.smoothing!r}, "
            f"bandwidth={self.bandwidth}, delta={self.delta}"
        )


OPTIONS = (
    Option("num_knots", int, 32, "anchors (train) and running knots (eval) per channel", 2, 1024),
    Option("smoothing", str, "adaptive", "kernel widths, or hard ranks", choices=SMOOTHINGS),
    Option("bandwidth", float, 1.0, "scales the widths: local gap or 1.06 K^-1/5", 0.05, 20.0),
    Option("delta", float, 1e-6, "clip F to [delta, 1-delta]; train: >= 1/(2n)", 1e-6, 0.25),
    MOMENTUM,
    EPS,
    AFFINE,
)


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=NAME,
            summary="probability integral transform: Phi^-1 of a smoothed empirical CDF",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=PIT,
            options=OPTIONS,
            reference="Silverman, Density Estimation for Statistics and Data Analysis, 1986 "
            "(sections 3.4, 5.3, 6.4); Breiman, Meisel & Purcell, Technometrics 1977 "
            "(variable kernels); Ioffe & Szegedy, ICML 2015 (running statistics)",
        )
    )
