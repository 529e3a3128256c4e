"""``AffineNorm`` and ``NormBase``: what every norm with a per-channel affine, and every norm
with running statistics, shares.

Modelled on torch's ``nn.modules.batchnorm._NormBase``: the constructor arguments
``num_features``, ``layout``, ``eps``, ``momentum`` and ``affine``; the per-channel ``weight``
(gamma) and ``bias`` (beta); running statistics kept as registered buffers (so ``state_dict``,
``.to(device)`` and DDP see them) with a ``num_batches_tracked`` counter;
:meth:`~NormBase.reset_parameters`, :meth:`~NormBase.reset_running_stats`, ``extra_repr`` and a
versioned state dict. A norm derives from it, declares its running statistics with
:meth:`~NormBase.register_running_stat` and writes ``forward``. Deriving is optional: the
registry accepts any ``nn.Module``.

Running averages follow torch: each training batch moves a running statistic by
``running = (1 - w) * running + w * batch`` with ``w = momentum``, or ``w = 1 / k`` at the
``k``-th batch when ``momentum is None``, which makes the running value the plain mean of the
batch values seen since the last reset (a cumulative average).

Re-estimating running statistics (the harness's "precise BN" step) is a declared capability:
:func:`reestimable_norms` finds the modules that have it (every ``NormBase`` and torch's own
norms that track running statistics; both reset and average cumulatively the same way), and
:func:`cumulative_running_stats` switches them to a fresh cumulative average for a while.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase as _TorchNormBase

from normzoo.interface import AFFINE, EPS, MOMENTUM
from normzoo.layouts import Layout, get_layout
from normzoo.stats import channel_affine, update_running

RunningInit = Callable[[], torch.Tensor]


class AffineNorm(nn.Module):
    """Base of every bundled norm: channels, layout, ``eps`` and the per-channel affine.

    Parameters
    ----------
    num_features:
        Number of channels ``C``.
    layout:
        A layout name (see :mod:`normzoo.layouts`); stored as its canonical name.
    eps:
        Added to variances (or covariances) before taking roots; > 0.
    affine:
        Learn a per-channel ``weight`` (init 1) and ``bias`` (init 0); with ``False`` both are
        ``None`` and :meth:`affine_transform` returns its input unchanged.
    bias:
        With ``affine``, learn the shift too (RMS norm learns a scale only).

    Stateless norms (layer, group, instance, RMS norm) derive from this class directly; norms
    with running statistics derive from :class:`NormBase`.
    """

    def __init__(
        self,
        num_features: int,
        layout: str | Layout,
        eps: float = EPS.default,
        affine: bool = AFFINE.default,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.layout = get_layout(layout).name
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight: nn.Parameter | None = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def layout_spec(self) -> Layout:
        """The :class:`~normzoo.layouts.Layout` object of :attr:`layout`."""
        return get_layout(self.layout)

    def reset_parameters(self) -> None:
        """``weight`` to ones and ``bias`` to zeros (nothing to do when ``affine=False``)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def affine_transform(self, y: torch.Tensor) -> torch.Tensor:
        """``weight * y + bias`` per channel of :attr:`layout`; ``y`` itself without affine."""
        return channel_affine(y, self.weight, self.bias, self.layout)

    def extra_repr(self) -> str:
        return f"{self.num_features}, layout={self.layout!r}, eps={self.eps}, affine={self.affine}"


class NormBase(AffineNorm):
    """Base class of normzoo's norms with running statistics (modelled on torch's ``_NormBase``).

    Parameters
    ----------
    num_features, layout, eps, affine:
        As for :class:`AffineNorm`.
    momentum:
        Weight of the new batch in the running statistics, or ``None`` for a cumulative average.

    State-dict versions (``_version``; torch stores it in the state dict's metadata):

    1. normzoo 0.1.0: the norms were plain modules; the whitening norms had no
       ``num_batches_tracked``.
    2. ``NormBase``: every norm has ``num_batches_tracked``. A version-1 state dict without it
       loads with the counter at 0.

    A subclass that changes its buffers bumps ``_version`` and upgrades older state dicts in
    :meth:`upgrade_state_dict`.
    """

    _version = 2
    #: Declares that :func:`reestimable_norms` may reset and re-average the running statistics.
    reestimable = True

    def __init__(
        self,
        num_features: int,
        layout: str | Layout,
        eps: float = EPS.default,
        momentum: float | None = MOMENTUM.default,
        affine: bool = AFFINE.default,
    ) -> None:
        self._running_inits: dict[str, RunningInit] = {}
        super().__init__(num_features, layout, eps, affine)
        self.momentum = momentum
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    # -- parameters and running statistics ------------------------------------------------------

    def register_running_stat(self, name: str, initial: RunningInit) -> None:
        """Register buffer ``name`` holding a running statistic, initialised by ``initial()``.

        :meth:`reset_running_stats` refills it from ``initial()``; :meth:`update_running_stats`
        averages batch values into it.
        """
        self._running_inits[name] = initial
        self.register_buffer(name, initial())

    def reset_parameters(self) -> None:
        """Parameters back to their initial values, and the running statistics too."""
        super().reset_parameters()
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Running statistics back to their initial values, ``num_batches_tracked`` to 0."""
        with torch.no_grad():
            for name, initial in self._running_inits.items():
                getattr(self, name).copy_(initial())
            if hasattr(self, "num_batches_tracked"):  # not yet while __init__ runs
                self.num_batches_tracked.zero_()
        self.running_stats_changed()

    def running_average_weight(self) -> float:
        """Count one more training batch and return the weight of its statistics:
        ``momentum``, or ``1 / num_batches_tracked`` for a cumulative average."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    @torch.no_grad()
    def update_running_stats(self, **batch: torch.Tensor) -> None:
        """Average this batch's statistics (one keyword per registered running statistic)
        into the running ones, counting the batch once."""
        weight = self.running_average_weight()
        for name, value in batch.items():
            if name not in self._running_inits:
                raise KeyError(f"{name!r} is not a running statistic of {type(self).__name__}")
            update_running(getattr(self, name), value, weight)
        self.running_stats_changed()

    def running_stats_changed(self) -> None:
        """Hook called whenever the running statistics change (update, reset, load); a norm
        that caches something derived from them (e.g. an eval whitening matrix) drops it."""

    # -- state dicts -------------------------------------------------------------------------------

    def upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        """Bring a state dict saved at ``version`` (< :attr:`_version`) up to date, in place.

        The base adds a missing ``num_batches_tracked`` (version 1 of the whitening norms).
        Subclasses that change their buffers extend this and call ``super()``.
        """
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if version is None or version < self._version:
            self.upgrade_state_dict(state_dict, prefix, 1 if version is None else version)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.running_stats_changed()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, layout={self.layout!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )


def reestimable_norms(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose running statistics can be re-estimated.

    A module declares the capability with the class attribute ``reestimable = True`` and then
    implements ``reset_running_stats()`` and a ``momentum`` attribute that treats ``None`` as a
    cumulative average. :class:`NormBase` declares it for every subclass; a norm that does not
    derive from it can declare it too. torch's own norms that track running statistics
    (``nn.BatchNorm*d``, ``nn.SyncBatchNorm``, instance norms with ``track_running_stats=True``)
    implement exactly that contract and are included.
    """
    return [
        module
        for module in model.modules()
        if getattr(type(module), "reestimable", False) is True
        or (isinstance(module, _TorchNormBase) and module.track_running_stats)
    ]


@contextmanager
def cumulative_running_stats(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Reset the running statistics of ``norms`` and average every following train-mode batch
    with equal weight; the momenta are restored on exit (the statistics are kept).

    After ``k`` batches each running statistic is the plain mean of the ``k`` batch values, the
    population estimate of "precise BN" (Wu & Johnson, *Rethinking "Batch" in BatchNorm*, 2021).
    """
    saved = [module.momentum for module in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    try:
        yield
    finally:
        for module, momentum in zip(norms, saved, strict=True):
            module.momentum = momentum
