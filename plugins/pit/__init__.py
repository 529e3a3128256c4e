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
the knots, which costs about 100 times an addition on a CPU. On the CPU, loops compiled with
numba (:mod:`~normzoo_plugins.pit.kernel`) do the per-value work, build the table from the
knots (with its derivative written out) and search sorted rows; elsewhere torch operations
compute the same function.

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

from normzoo.hookspecs import hookimpl
from normzoo.interface import NormInfo
from normzoo.layouts import LAYOUT_NAMES
from normzoo_plugins.pit.norm import NAME, OPTIONS, PIT

__all__ = ["PIT", "normzoo_register_norms"]


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
