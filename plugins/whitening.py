"""Whitening norms: decorrelated batch norm (``zca``) and iterative normalization (``iternorm``).

Both whiten groups of channels instead of standardizing each channel on its own. In ``train()``
mode the input is viewed as a ``(C, m)`` matrix (``m = N`` for ``fc``, ``N * H * W`` for
``conv``), its channels are split into groups of ``g = min(group_size, C)`` (the last group may
be smaller) and, for each group::

    Xc    = X - mean(X)                        (centred, g x m)
    Sigma = Xc Xc^T / m + eps I                (biased; g x g rest in float64)
    W     = f(Sigma)  ~  Sigma^-1/2
    y     = gamma * (W Xc) + beta              (gamma, beta per channel)

Grouping makes the whitening matrix block diagonal: the cost is ``O(C g m)`` for the covariance
and for ``W Xc`` plus ``O(C g^2)`` per matrix function, instead of ``O(C^2 m + C^3)``.

The two norms differ only in ``f``:

``zca``
    ``W = U diag(lambda)^-1/2 U^T`` from ``eigh``, the exact symmetric (ZCA) inverse square root;
    its backward is the gap-free Daleckii-Krein formula of :class:`InvSqrtm`.
``iternorm``
    ``T`` coupled Newton-Schulz steps on ``Sigma / tr(Sigma)``; only matrix products, so autograd
    differentiates it; ``T = 5`` whitens partially, by design.

Running statistics follow torch's convention ``running = (1 - momentum) * running + momentum *
batch``. The running covariance averages the *unbiased* batch covariance ``Xc Xc^T / (m - 1)``
(without ``eps``, as batch norm's running variance); eval uses ``W = f(running_cov + eps I)``.
Averaging ``Sigma`` rather than ``W`` matters: ``Sigma -> Sigma^-1/2`` is operator convex, so a
mean of batch ``W`` s is larger than ``W`` of the mean covariance and would over-whiten at eval.
The eval ``W`` is computed once and cached in a non-persistent buffer until the next training
step or ``load_state_dict``.

Storage: ``running_cov`` and the cached ``W`` have shape ``(groups, g, g)``; when the last group
has ``r < g`` channels, its block is padded with the identity beyond ``r``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch.nn import functional as F

from normzoo import distributed
from normzoo.base import NormBase
from normzoo.hookspecs import hookimpl
from normzoo.interface import (
    AFFINE,
    EPS,
    MOMENTUM,
    SYNC,
    NormInfo,
    Option,
    check_batch_size,
    check_input,
)
from normzoo.layouts import LAYOUT_NAMES
from normzoo.stats import unbiased, upcast


def _eye_like(sigma: torch.Tensor) -> torch.Tensor:
    return torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)


def _padding_eye(size: int, used: int, like: torch.Tensor) -> torch.Tensor:
    """``(size, size)`` diagonal with ones on the ``size - used`` padding positions only."""
    return torch.diag((torch.arange(size, device=like.device) >= used).to(like.dtype))


class InvSqrtm(torch.autograd.Function):
    """``Sigma -> Sigma^-1/2`` of symmetric positive definite ``(..., k, k)`` matrices by ``eigh``.

    Forward: the input is symmetrized, ``A = (Sigma + Sigma^T) / 2`` (``eigh`` reads one
    triangle only, so this makes the function, and its gradient, well defined for any square
    input), then ``A = U diag(lambda) U^T`` and ``W = U diag(1 / s) U^T`` with ``s = sqrt(lambda)``,
    symmetrized again against rounding.
    Eigenvalues are floored at ``float_eps * lambda_max`` so that rounding cannot make them
    negative; with ``eps > 0`` added to ``Sigma`` the floor never binds in practice.

    Backward (Daleckii-Krein): the derivative of a matrix function ``f`` at ``A`` in direction
    ``E`` is ``U (L o (U^T E U)) U^T`` with ``L_ij`` the divided difference
    ``(f(lambda_i) - f(lambda_j)) / (lambda_i - lambda_j)``, ``f'(lambda_i)`` on ties. For
    ``f = lambda^-1/2`` it simplifies to ``L_ij = -1 / (s_i s_j (s_i + s_j))``, with no
    ``lambda_i - lambda_j`` left in it: finite and accurate when eigenvalues (nearly) coincide,
    where autograd through ``eigh`` divides by the gap and returns inf or noise. ``L`` is
    symmetric, so the adjoint is the same map applied to the symmetrized upstream gradient::

        dL/dSigma = U (L o (U^T sym(G) U)) U^T,   sym(G) = (G + G^T) / 2
    """

    @staticmethod
    def forward(ctx: Any, sigma: torch.Tensor) -> torch.Tensor:
        lam, u = torch.linalg.eigh((sigma + sigma.mT) / 2)
        tiny = torch.finfo(lam.dtype).tiny
        floor = torch.finfo(lam.dtype).eps * lam.amax(dim=-1, keepdim=True).clamp_min(tiny)
        s = torch.maximum(lam, floor).sqrt()
        ctx.save_for_backward(u, s)
        w = (u / s.unsqueeze(-2)) @ u.mT
        return (w + w.mT) / 2  # exactly symmetric, not just up to rounding

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        u, s = ctx.saved_tensors
        inner = u.mT @ ((grad + grad.mT) / 2) @ u
        s_i, s_j = s.unsqueeze(-1), s.unsqueeze(-2)
        return u @ (inner / -(s_i * s_j * (s_i + s_j))) @ u.mT


def inv_sqrtm(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric inverse square root ``Sigma^-1/2`` of SPD ``(..., k, k)`` matrices (ZCA ``W``).

    Differentiable with the gap-free backward of :class:`InvSqrtm`.
    """
    return InvSqrtm.apply(sigma)


def newton_schulz_inv_sqrt(sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximate ``Sigma^-1/2`` by ``iterations`` coupled Newton-Schulz steps (IterNorm's ``W``).

    ``Sigma`` is first scaled to ``Sigma_N = Sigma / tr(Sigma)``, whose eigenvalues lie in
    ``(0, 1]``, the region where the iteration converges. Then, from ``Y = Sigma_N, Z = I``::

        M = (3 I - Z Y) / 2,   Y <- Y M,   Z <- M Z        (Y -> Sigma_N^1/2, Z -> Sigma_N^-1/2)

    and ``W = Z / sqrt(tr Sigma)``. An eigenvalue ``a`` of ``Sigma_N`` far below 1 grows its
    ``Z`` value by about 1.5x per step until it nears ``a^-1/2``, then converges quadratically,
    so a small ``iterations`` (IterNorm's 5) stretches the weak directions only partly: partial
    whitening, by design. The coupled form feeds ``Y`` and ``Z`` back into each other, so rounding
    errors do not grow with ``iterations``; the uncoupled ``P <- (3P - P^3 Sigma_N) / 2`` of the
    reference code drifts and diverges beyond about 10 to 15 steps.
    """
    return NewtonSchulz.apply(sigma, iterations)


class NewtonSchulz(torch.autograd.Function):
    """:func:`newton_schulz_inv_sqrt` with its reverse pass written out, so that autograd does
    not record the iteration's 3 products and 2 elementwise operations per step as separate
    nodes (on LeNet's small groups their bookkeeping cost more than the products).

    Backward, ``G`` the upstream gradient of ``W = Z_T / sqrt(t)``, ``t = tr Sigma``, in
    reverse over the steps (``Y_k, Z_k, M_k`` as in the forward)::

        dZ_T = G / sqrt(t),   dt = -<G, Z_T> / (2 t sqrt t),   dY_T = 0
        dM   = Y_k-1^T dY_k + dZ_k Z_k-1^T
        dY_k-1 = dY_k M_k^T - Z_k-1^T dM / 2,   dZ_k-1 = M_k^T dZ_k - dM Y_k-1^T / 2
        dSigma = dY_0 / t + (dt - <dY_0, Sigma> / t^2) I
    """

    @staticmethod
    def forward(ctx: Any, sigma: torch.Tensor, iterations: int) -> torch.Tensor:
        eye = _eye_like(sigma)
        trace = sigma.diagonal(dim1=-2, dim2=-1).sum(dim=-1)[..., None, None]
        y = sigma / trace
        z = eye.expand_as(sigma)
        steps = []
        for _ in range(iterations):
            m = (3 * eye - z @ y) / 2
            steps += [y, z, m]
            y, z = y @ m, m @ z
        ctx.save_for_backward(sigma, trace, z, *steps)
        return z / trace.sqrt()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        sigma, trace, z_last, *steps = ctx.saved_tensors
        root = trace.sqrt()
        d_z = grad / root
        d_trace = -(grad * z_last).sum(dim=(-2, -1), keepdim=True) / (2 * trace * root)
        d_y = torch.zeros_like(grad)
        for k in range(len(steps) - 3, -1, -3):
            y, z, m = steps[k : k + 3]
            d_m = y.mT @ d_y + d_z @ z.mT
            d_y, d_z = d_y @ m.mT - z.mT @ d_m / 2, m.mT @ d_z - d_m @ y.mT / 2
        d_trace = d_trace - (d_y * sigma).sum(dim=(-2, -1), keepdim=True) / trace**2
        return d_y / trace + d_trace * _eye_like(sigma), None


def _identity_blocks(num_groups: int, size: int) -> torch.Tensor:
    return torch.eye(size).expand(num_groups, size, size).clone()


class GroupWhitening(NormBase):
    """Base of the whitening norms: grouping, running statistics, the eval cache and the affine.

    Subclasses set ``NAME`` and implement :meth:`matrix_function`, ``W = f(Sigma)`` for a batch
    of ``(..., k, k)`` float64 covariances that already include ``eps``.

    Parameters
    ----------
    num_features, layout, eps, momentum, affine:
        As for :class:`~normzoo.NormBase`; ``eps`` is added to the diagonal of each covariance.
    group_size:
        Channels whitened together; ``min(group_size, C)``, the last group may be smaller.
    sync:
        Under torch.distributed with several processes, the train-mode mean and covariance are
        those of the global batch: one collective sums the count, the sums and the sums of
        outer products (float64) over the processes, exact for any split of the batch.
    """

    NAME = ""

    def __init__(
        self,
        num_features: int,
        layout: str,
        group_size: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        sync: bool,
    ) -> None:
        self._cache_valid = False
        super().__init__(num_features, layout, eps, momentum, affine)
        self.sync = sync
        self.group_size = min(group_size, num_features)
        self.num_groups = -(-num_features // self.group_size)
        self.last_group_size = num_features - (self.num_groups - 1) * self.group_size
        eye = partial(_identity_blocks, self.num_groups, self.group_size)
        self.register_running_stat("running_mean", partial(torch.zeros, num_features))
        self.register_running_stat("running_cov", eye)
        self.register_buffer("eval_whitening", eye(), persistent=False)

    def matrix_function(self, sigma: torch.Tensor) -> torch.Tensor:
        """``W = f(Sigma)`` for ``(..., k, k)`` float64 ``Sigma`` (eps included)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.layout, self.NAME)
        grouped = self._channel_view(upcast(x))
        if self.training and distributed.active(self.sync):
            mean, cov, count = self._global_moments(grouped)
            check_batch_size(x, self.NAME, self.layout, values=float(count))
            blocks = self._to_blocks(grouped - mean.to(grouped.dtype).unsqueeze(1))
            whitening = self.whitening_matrices(cov)
            self._update_running_stats(mean.detach(), cov.detach(), count)
        elif self.training:
            check_batch_size(x, self.NAME, self.layout)
            count = grouped.shape[0] * grouped.shape[2]
            mean = grouped.sum(dim=2).sum(dim=0) / count
            blocks = self._to_blocks(grouped - mean.unsqueeze(1))
            # the (g, m) x (m, g) products in the input's precision, the g x g rest in float64:
            # a float64 product over m = N H W values cost more than the rest of LeNet's step
            cov = ((blocks @ blocks.mT).sum(dim=0) / count).double()
            whitening = self.whitening_matrices(cov)
            self._update_running_stats(mean, cov, count)
        else:
            blocks = self._to_blocks(grouped - self.running_mean.to(grouped.dtype).unsqueeze(1))
            whitening = self._eval_whitening()
        whitened = self._from_blocks(whitening.to(blocks.dtype) @ blocks)
        return self.affine_transform(self._restore(whitened, x)).to(x.dtype)

    def _global_moments(
        self, grouped: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean ``(C,)``, biased covariance blocks ``(groups, g, g)`` and count of the global
        batch, in float64, from this process's ``(B, C, m)`` share."""
        values = grouped.double()
        count = values.new_tensor(float(values.shape[0] * values.shape[2]))
        blocks = self._to_blocks(values)
        total, sums, outer = distributed.sum_over_processes(
            count, values.sum(dim=2).sum(dim=0), (blocks @ blocks.mT).sum(dim=0)
        )
        safe = total.clamp_min(1.0)
        mean = sums / safe
        padded = F.pad(mean, (0, self.num_groups * self.group_size - self.num_features))
        centre = padded.reshape(self.num_groups, self.group_size)
        cov = outer / safe - centre.unsqueeze(-1) * centre.unsqueeze(-2)
        return mean, cov, total.detach()

    def _channel_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(B, C, m)`` without copying a contiguous input: ``(N, C, positions)`` for
        the channels-first layouts with positions, the ``(1, C, values)`` channel matrix for
        ``fc`` and ``seq`` (a transposed view). A ``(C, N * positions)`` matrix of an image
        batch would be a transposed copy of input and output, which cost as much as the
        whitening itself."""
        layout = self.layout_spec
        if layout.channels_last or x.dim() == 2:
            return layout.to_channel_matrix(x).unsqueeze(0)
        return x.flatten(2)

    def _restore(self, grouped: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_channel_view`."""
        layout = self.layout_spec
        if layout.channels_last or like.dim() == 2:
            return layout.from_channel_matrix(grouped.squeeze(0), like)
        return grouped.reshape(like.shape)

    def whitening_matrices(self, cov: torch.Tensor) -> torch.Tensor:
        """``W = f(cov + eps I)`` per group, ``(groups, g, g)``, identity-padded last block.

        ``cov`` is ``(groups, g, g)`` without ``eps``; only the first ``r`` rows and columns of
        the last block are read when the last group has ``r < g`` channels. The full groups go
        through ``f`` as one batch, the last group on its own, so that ``f`` never sees the
        padding (IterNorm's trace scaling would).
        """
        sigma = cov.double() + self.eps * _eye_like(cov).double()
        g, r = self.group_size, self.last_group_size
        if r == g:
            return self.matrix_function(sigma)
        last = self.matrix_function(sigma[-1:, :r, :r])
        last = F.pad(last, (0, g - r, 0, g - r)) + _padding_eye(g, r, last)
        return torch.cat([self.matrix_function(sigma[:-1]), last])

    def _to_blocks(self, grouped: torch.Tensor) -> torch.Tensor:
        """``(B, C, m) -> (B, groups, g, m)``, zero rows padding the last group."""
        padding = self.num_groups * self.group_size - self.num_features
        if padding:
            grouped = F.pad(grouped, (0, 0, 0, padding))
        return grouped.reshape(grouped.shape[0], self.num_groups, self.group_size, grouped.shape[2])

    def _from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``(B, groups, g, m) -> (B, C, m)``, dropping the padding rows."""
        grouped = blocks.reshape(
            blocks.shape[0], self.num_groups * self.group_size, blocks.shape[3]
        )
        return grouped[:, : self.num_features]

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, cov: torch.Tensor, count: int) -> None:
        g, r = self.group_size, self.last_group_size
        batch_cov = unbiased(cov, count)
        batch_cov[-1] += _padding_eye(g, r, cov)
        self.update_running_stats(running_mean=mean, running_cov=batch_cov)

    @torch.no_grad()
    def _eval_whitening(self) -> torch.Tensor:
        if not self._cache_valid:
            self.eval_whitening.copy_(self.whitening_matrices(self.running_cov))
            self._cache_valid = True
        return self.eval_whitening

    def running_stats_changed(self) -> None:
        """New running covariance: recompute the eval ``W`` on the next eval forward."""
        self._cache_valid = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class ZCAWhitening(GroupWhitening):
    """Decorrelated batch norm: exact ZCA whitening ``W = Sigma^-1/2`` by ``eigh``.

    ZCA, not PCA (``diag(lambda)^-1/2 U^T``): PCA's output axes are the eigenvectors, whose
    order and signs change from batch to batch, so the next layer sees a different rotation at
    every step and training fails; ZCA rotates back, ``W`` is symmetric and unique, and the
    output stays aligned with the input channels (permuting channels permutes the output).
    """

    NAME = "zca"

    def matrix_function(self, sigma: torch.Tensor) -> torch.Tensor:
        return inv_sqrtm(sigma)


class CholeskyWhitening(GroupWhitening):
    """Cholesky (CD) whitening: ``W = L^-1`` with ``Sigma = L L^T``, ``L`` lower triangular.

    The decorrelated-BN family's cheapest exact whitening: one factorization and a triangular
    solve, gradients through both by autograd (no eigenvalue gaps in them). ``W`` is not
    symmetric: output channel ``i`` mixes input channels ``1 .. i`` only, so the channel order
    matters (permuting the channels does not permute the output), unlike ZCA.
    """

    NAME = "cholesky-whitening"

    def matrix_function(self, sigma: torch.Tensor) -> torch.Tensor:
        lower = torch.linalg.cholesky(sigma)
        return torch.linalg.solve_triangular(lower, _eye_like(sigma).expand_as(sigma), upper=False)


class PCAWhitening(GroupWhitening):
    """PCA whitening: ``W = Lambda^-1/2 U^T``, the output axes the principal components.

    With ``Sigma = U diag(lambda) U^T`` from ``eigh``, components in decreasing order of
    variance. This is the variant the decorrelated-BN paper shows failing: an eigenvector's
    sign, and the order of close eigenvalues, can change from one batch to the next, so the
    next layer sees its inputs swapped or flipped between steps ("stochastic axis swapping").
    It is here so that the claim can be tested. The gradient goes through ``eigh`` by autograd,
    which divides by eigenvalue gaps: it is inf or noise where two eigenvalues coincide.
    """

    NAME = "pca-whitening"

    def matrix_function(self, sigma: torch.Tensor) -> torch.Tensor:
        lam, u = torch.linalg.eigh((sigma + sigma.mT) / 2)
        lam, u = lam.flip(-1), u.flip(-1)  # the largest variance first
        return u.mT / lam.sqrt().unsqueeze(-1)


class IterNorm(GroupWhitening):
    """Iterative normalization: ``W`` from ``iterations`` coupled Newton-Schulz steps.

    See :func:`newton_schulz_inv_sqrt`; the other parameters are those of
    :class:`GroupWhitening`.
    """

    NAME = "iternorm"

    def __init__(
        self,
        num_features: int,
        layout: str,
        iterations: int,
        group_size: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        sync: bool,
    ) -> None:
        super().__init__(num_features, layout, group_size, eps, momentum, affine, sync)
        self.iterations = iterations

    def matrix_function(self, sigma: torch.Tensor) -> torch.Tensor:
        return newton_schulz_inv_sqrt(sigma, self.iterations)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iterations={self.iterations}"


GROUP_SIZE = Option(
    "group_size", int, 16, "channels whitened together (the last group may be smaller)", 1
)
COVARIANCE_EPS = replace(EPS, help="added to the diagonal of each covariance")
ITERATIONS = Option("iterations", int, 5, "Newton-Schulz steps T (5 whitens partially)", 1)


@hookimpl
def normzoo_register_norms(register: Callable[[NormInfo], None]) -> None:
    register(
        NormInfo(
            name=ZCAWhitening.NAME,
            summary="decorrelated batch norm: ZCA whitening of channel groups (eigh)",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=ZCAWhitening,
            options=(GROUP_SIZE, COVARIANCE_EPS, MOMENTUM, AFFINE, SYNC),
            reference="Huang, Yang, Lang & Deng, Decorrelated Batch Normalization, CVPR 2018",
        )
    )
    for factory, summary, reference in (
        (
            CholeskyWhitening,
            "Cholesky whitening of channel groups: W = L^-1, Sigma = L L^T",
            "Huang, Yang, Lang & Deng, Decorrelated Batch Normalization, CVPR 2018 (CD "
            "whitening); Kessy, Lewin & Strimmer, Optimal Whitening and Decorrelation, 2018",
        ),
        (
            PCAWhitening,
            "PCA whitening of channel groups: W = Lambda^-1/2 U^T (the variant shown failing)",
            "Huang, Yang, Lang & Deng, Decorrelated Batch Normalization, CVPR 2018 (section "
            "3.1: PCA whitening and stochastic axis swapping)",
        ),
    ):
        register(
            NormInfo(
                name=factory.NAME,
                summary=summary,
                layouts=LAYOUT_NAMES,
                uses_batch_stats=True,
                factory=factory,
                options=(GROUP_SIZE, COVARIANCE_EPS, MOMENTUM, AFFINE, SYNC),
                reference=reference,
            )
        )
    register(
        NormInfo(
            name=IterNorm.NAME,
            summary="iterative normalization: Newton-Schulz whitening of channel groups",
            layouts=LAYOUT_NAMES,
            uses_batch_stats=True,
            factory=IterNorm,
            options=(ITERATIONS, GROUP_SIZE, COVARIANCE_EPS, MOMENTUM, AFFINE, SYNC),
            reference="Huang, Zhou, Zhu, Liu & Shao, Iterative Normalization: Beyond "
            "Standardization towards Efficient Whitening, CVPR 2019",
        )
    )
