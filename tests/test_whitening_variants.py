"""Reference tests of the two other whitenings, ``cholesky-whitening`` and ``pca-whitening``.

The references are written independently with numpy: ``np.linalg.cholesky`` and a triangular
inverse, ``np.linalg.eigh`` sorted by decreasing eigenvalue. PCA's eigenvectors are defined up
to sign, so its outputs are compared channel by channel up to a sign; gradients are checked
against finite differences in float64 (``torch.autograd.gradcheck``), train and eval.
"""

import numpy as np
import pytest
import torch

from tests.test_whitening import EPS, build, channels_np, correlated, cov_np


def cholesky_np(sigma: np.ndarray) -> np.ndarray:
    lower = np.linalg.cholesky(sigma + EPS * np.eye(len(sigma)))
    return np.linalg.inv(lower)


def pca_np(sigma: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh(sigma + EPS * np.eye(len(sigma)))
    order = np.argsort(lam)[::-1]
    return np.diag(lam[order] ** -0.5) @ u[:, order].T


REFERENCE = {"cholesky-whitening": cholesky_np, "pca-whitening": pca_np}
NORMS = list(REFERENCE)


def grouped_reference(xm: np.ndarray, fit: np.ndarray, w_of, group: int, ddof: int) -> np.ndarray:
    """``W (x - mean)`` per group of ``group`` channels, statistics of ``fit`` (``(C, m)``)."""
    out = []
    for start in range(0, len(xm), group):
        rows = slice(start, start + group)
        w = w_of(cov_np(fit[rows], ddof))
        out.append(w @ (xm[rows] - fit[rows].mean(axis=1, keepdims=True)))
    return np.concatenate(out)


def same_up_to_row_signs(have: np.ndarray, want: np.ndarray, signs: bool) -> None:
    if signs:  # each output channel of PCA may come out negated
        flip = np.sign((have * want).sum(axis=1, keepdims=True))
        have = have * flip
    np.testing.assert_allclose(have, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["fc", "conv"])
def test_train_and_eval_equal_the_numpy_formula(norm, layout):
    """Groups of 4 over 6 channels (the last group has 2), three training steps with momentum
    0.3, then eval with the running mean and the running (unbiased) covariance."""
    spatial = (3, 2) if layout == "conv" else ()
    module = build(norm, 6, layout, group_size=4, momentum=0.3)
    running_mean, running_cov = np.zeros(6), np.eye(6)
    for seed in (1, 2, 3):
        x = correlated(24, 6, seed=seed, spatial=spatial)
        y = module(x)
        xm = channels_np(x)
        want = grouped_reference(xm, xm, REFERENCE[norm], 4, ddof=0)
        same_up_to_row_signs(channels_np(y), want, signs=norm == "pca-whitening")
        running_mean = 0.7 * running_mean + 0.3 * xm.mean(axis=1)
        blocks = np.zeros((6, 6))
        for start in range(0, 6, 4):
            rows = slice(start, start + 4)
            blocks[rows, rows] = cov_np(xm[rows], ddof=1)
        running_cov = 0.7 * running_cov + 0.3 * blocks
    np.testing.assert_allclose(module.running_mean.numpy(), running_mean, atol=1e-12)
    np.testing.assert_allclose(module.running_cov[0].numpy(), running_cov[:4, :4], atol=1e-12)
    np.testing.assert_allclose(module.running_cov[1, :2, :2].numpy(), running_cov[4:, 4:],
                               atol=1e-12)  # fmt: skip
    module.eval()
    x = correlated(10, 6, seed=9, spatial=spatial)
    xm = channels_np(x)
    want = []
    for start in range(0, 6, 4):
        rows = slice(start, start + 4)
        w = REFERENCE[norm](running_cov[rows, rows])
        want.append(w @ (xm[rows] - running_mean[rows, None]))
    same_up_to_row_signs(channels_np(module(x)), np.concatenate(want),
                         signs=norm == "pca-whitening")  # fmt: skip


def test_cholesky_output_channel_i_reads_input_channels_up_to_i():
    module = build("cholesky-whitening", 5)
    x = correlated(32, 5, seed=4).requires_grad_(True)
    module(x)[:, 1].sum().backward()
    assert x.grad[:, 2:].abs().max() == 0 and x.grad[:, :2].abs().max() > 0


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("training", [True, False])
def test_module_gradcheck(norm, training):
    module = build(norm, 5, group_size=3, momentum=0.5)
    module(correlated(20, 5, seed=5))  # running statistics for eval
    module.train(training)
    x = correlated(12, 5, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: module(t), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_output_covariance_is_whitened(norm):
    """Both whiten exactly: the output covariance is Sigma / (Sigma + eps) ~ I."""
    x = correlated(200, 8, seed=7)
    y = channels_np(build(norm, 8, group_size=8)(x))
    np.testing.assert_allclose(cov_np(y), np.eye(8), atol=1e-4)


def test_pca_orders_components_by_decreasing_variance():
    """Its first output channel is the direction of the largest variance: the top eigenvector
    of the batch covariance, scaled to unit variance."""
    x = correlated(100, 4, seed=8)
    module = build("pca-whitening", 4, affine=False)
    y = channels_np(module(x))
    xm = channels_np(x)
    lam, u = np.linalg.eigh(cov_np(xm))
    top = u[:, -1] @ (xm - xm.mean(axis=1, keepdims=True)) / np.sqrt(lam[-1] + EPS)
    same_up_to_row_signs(y[:1], top[None], signs=True)
