"""Eval-mode fidelity of a norm's running statistics: train on a stream from one distribution,
then compare the eval output on fresh data with the population transform ``Phi^-1(F(x))``
(the mid-p value ``Phi^-1(P(X < a) + P(X = a) / 2)`` at an atom ``a``).

Used by ``tests/test_pit.py`` and, to print the table of docs/norms/pit.md::

    python -m tests.pit_fidelity            # pit and batch norm's yardstick, every case
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import special, stats
from torch import nn

import normzoo

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def _mid_p(dist: stats.rv_discrete, x: np.ndarray) -> np.ndarray:
    return dist.cdf(x - 1) + 0.5 * dist.pmf(x)


def _mixture_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * stats.norm(-3, 1).cdf(x) + 0.5 * stats.norm(3, 1).cdf(x)


#: name -> (sampler, population transform Phi^-1(F(x)) with mid-p values at atoms)
DISTRIBUTIONS: dict[str, tuple[Sampler, Callable[[np.ndarray], np.ndarray]]] = {
    "gaussian": (
        lambda g, n: g.normal(2.0, 3.0, n),
        lambda x: (x - 2.0) / 3.0,
    ),
    "exponential": (
        lambda g, n: g.exponential(1.0, n),
        lambda x: special.ndtri(stats.expon().cdf(x)),
    ),
    "lognormal": (
        lambda g, n: g.lognormal(0.0, 1.0, n),
        lambda x: np.log(x),
    ),
    "bimodal": (
        lambda g, n: np.where(g.random(n) < 0.5, -3.0, 3.0) + g.normal(0.0, 1.0, n),
        lambda x: special.ndtri(_mixture_cdf(x)),
    ),
    "student-t2": (
        lambda g, n: g.standard_t(2, n),
        lambda x: special.ndtri(stats.t(2).cdf(x)),
    ),
    "relu": (
        lambda g, n: np.maximum(g.normal(0.0, 1.0, n), 0.0),
        lambda x: np.where(x == 0, special.ndtri(0.25), x),
    ),
    "poisson": (
        lambda g, n: g.poisson(3.0, n).astype(np.float64),
        lambda x: special.ndtri(_mid_p(stats.poisson(3.0), x)),
    ),
}
BATCH_SIZES = (16, 64, 256, 2048)


def momentum_for(batch: int) -> float:
    """About 4,000 values in the running estimate: momentum ``2 n / 4000``, at most 0.1."""
    return min(0.1, 2.0 * batch / 4000.0)


def fidelity(
    build: Callable[[float], nn.Module],
    distribution: str,
    batch: int,
    seed: int = 0,
    fresh: int = 20_000,
    channels: int = 2,
    target: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float]:
    """Mean absolute error against the population transform, and the eval output's std.

    ``build(momentum)`` makes the module (``fc`` layout, ``channels`` channels); it is trained
    on ``max(200, 6 / momentum)`` batches of ``batch`` values per channel, then evaluated on
    ``fresh`` new values per channel. ``target`` replaces the population transform (batch
    norm's yardstick is standardization).
    """
    sample, population = DISTRIBUTIONS[distribution]
    target = target or population
    generator = np.random.default_rng(seed)
    momentum = momentum_for(batch)
    module = build(momentum).double().train()
    with torch.no_grad():
        for _ in range(int(max(200, 6 / momentum))):
            x = np.stack([sample(generator, batch) for _ in range(channels)], axis=1)
            module(torch.from_numpy(x))
        module.eval()
        x = np.stack([sample(generator, fresh) for _ in range(channels)], axis=1)
        y = module(torch.from_numpy(x)).numpy()
    return float(np.abs(y - target(x)).mean()), float(y.std(axis=0).mean())


def pit(momentum: float, **options: object) -> nn.Module:
    return normzoo.build("pit", 2, layout="fc", momentum=momentum, **options)


def batchnorm(momentum: float) -> nn.Module:
    return normzoo.build("batchnorm", 2, layout="fc", momentum=momentum)


def main() -> None:
    torch.set_num_threads(1)
    print("| channel | " + " | ".join(f"{n} values" for n in BATCH_SIZES) + " |")
    print("| --- |" + " --- |" * len(BATCH_SIZES))
    for name in DISTRIBUTIONS:
        cells = [fidelity(pit, name, batch) for batch in BATCH_SIZES]
        print(f"| {name} | " + " | ".join(f"{e:.3f} ({s:.2f})" for e, s in cells) + " |")
    cells = [
        fidelity(batchnorm, "gaussian", batch, target=lambda x: (x - 2.0) / 3.0)
        for batch in BATCH_SIZES
    ]
    print("| gaussian, batch norm | " + " | ".join(f"{e:.3f} ({s:.2f})" for e, s in cells) + " |")


if __name__ == "__main__":
    main()
