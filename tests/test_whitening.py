"""Reference tests of the whitening norms ``zca`` and ``iternorm`` (plugins/whitening.py).

The references are independent of the code under test: covariances and whitening matrices are
computed with numpy and scipy (``fractional_matrix_power``), Newton-Schulz is re-implemented in
numpy, and the one-channel case is compared with ``torch.nn.functional.batch_norm``.
"""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import normzoo
from normzoo_plugins.whitening import InvSqrtm, inv_sqrtm, newton_schulz_inv_sqrt

EPS = 1e-5
NORMS = ["zca", "iternorm"]


def correlated(n: int, c: int, seed: int = 0, spatial: tuple[int, ...] = ()) -> torch.Tensor:
    """float64 ``(n, c, *spatial)`` with strongly correlated channels and nonzero means."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *spatial, c), generator=gen, dtype=torch.float64)
    mixing = torch.randn(c, c, generator=gen, dtype=torch.float64)
    x = x @ mixing + torch.linspace(-2.0, 3.0, c, dtype=torch.float64)
    return x.movedim(-1, 1).contiguous()


def channels_np(x: torch.Tensor) -> np.ndarray:
    """``(C, m)`` numpy view of ``x``, values per channel in the columns."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1).numpy()


def cov_np(xm: np.ndarray, ddof: int = 0) -> np.ndarray:
    xc = xm - xm.mean(axis=1, keepdims=True)
    return xc @ xc.T / (xm.shape[1] - ddof)


def zca_np(sigma: np.ndarray) -> np.ndarray:
    return np.real(scipy.linalg.fractional_matrix_power(sigma + EPS * np.eye(len(sigma)), -0.5))


def newton_schulz_np(sigma: np.ndarray, iterations: int) -> np.ndarray:
    """Coupled Newton-Schulz for ``(sigma + eps I)^-1/2``, written from the IterNorm paper."""
    sigma = sigma + EPS * np.eye(len(sigma))
    trace = np.trace(sigma)
    y, z, eye = sigma / trace, np.eye(len(sigma)), np.eye(len(sigma))
    for _ in range(iterations):
        m = (3 * eye - z @ y) / 2
        y, z = y @ m, m @ z
    return z / np.sqrt(trace)


REFERENCE_W = {"zca": zca_np, "iternorm": lambda sigma: newton_schulz_np(sigma, 5)}


def whiten_np(x: torch.Tensor, w_of, ddof: int = 0, fit: torch.Tensor | None = None):
    """``W (x - mean)`` in numpy, ``W = w_of(covariance)``, statistics of ``fit`` (default x)."""
    xm = channels_np(x)
    fm = xm if fit is None else channels_np(fit)
    w = w_of(cov_np(fm, ddof))
    y = w @ (xm - fm.mean(axis=1, keepdims=True))
    return torch.from_numpy(y).reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


def build(norm: str, c: int, layout: str = "fc", **options) -> torch.nn.Module:
    return normzoo.build(norm, c, layout, **options).double().train()


# --- zca -----------------------------------------------------------------------------------


def test_inv_sqrtm_matches_scipy_and_is_symmetric():
    sigma = cov_np(channels_np(correlated(64, 6)))
    w = inv_sqrtm(torch.from_numpy(sigma + EPS * np.eye(6))).numpy()
    np.testing.assert_allclose(w, zca_np(sigma), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(w, w.T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zca_output_is_w_times_centred_input(dtype):
    x = correlated(64, 6, seed=1, spatial=(2, 3))
    module = build("zca", 6, "conv").to(dtype)
    y = module(x.to(dtype))
    assert y.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(y.double(), whiten_np(x, zca_np), rtol=tol, atol=tol)


def test_zca_output_covariance_is_sigma_over_sigma_plus_eps():
    x = correlated(50, 5, seed=2)
    sigma = cov_np(channels_np(x))
    out = cov_np(channels_np(build("zca", 5)(x)))
    np.testing.assert_allclose(out, sigma @ np.linalg.inv(sigma + EPS * np.eye(5)), atol=1e-9)


def test_zca_is_permutation_equivariant():
    x = correlated(40, 7, seed=3)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    module = build("zca", 7)
    torch.testing.assert_close(module(x[:, perm]), module(x)[:, perm], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", NORMS)
def test_group_size_one_is_batch_norm(norm):
    x = correlated(8, 5, seed=4, spatial=(3, 3)).float()
    y = normzoo.build(norm, 5, "conv", group_size=1).train()(x)
    expected = F.batch_norm(x, None, None, training=True, eps=EPS)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def random_spd(k: int, seed: int, eigenvalues=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    lam = (
        torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
        if eigenvalues is None
        else (torch.tensor(eigenvalues, dtype=torch.float64))
    )
    return q @ torch.diag(lam) @ q.T


def test_inv_sqrtm_gradcheck():
    batch = torch.stack([random_spd(4, 0), random_spd(4, 1, [1.0, 1.0 + 1e-7, 2.0, 3.0])])
    # a non-symmetric direction: the Function symmetrizes its input, so any square input works
    batch = (batch + 1e-3 * torch.randn(2, 4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(InvSqrtm.apply, (batch,))


def test_inv_sqrtm_gradient_matches_eigh_autograd_at_distinct_eigenvalues():
    """Tighter than gradcheck's tolerance: where eigh's own autograd is accurate, agree with it."""
    upstream = torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = random_spd(5, 2, [0.5, 1.0, 1.7, 2.5, 4.0]).requires_grad_()
    (inv_sqrtm(sigma) * upstream).sum().backward()
    naive = sigma.detach().clone().requires_grad_()
    lam, u = torch.linalg.eigh(naive)
    ((u / lam.sqrt()) @ u.T * upstream).sum().backward()
    torch.testing.assert_close(sigma.grad, (naive.grad + naive.grad.T) / 2, rtol=1e-10, atol=1e-12)


def test_inv_sqrtm_gradient_at_repeated_eigenvalues():
    """At ``Sigma = c I`` (all eigenvalues equal) ``dW = -c^-3/2 / 2 dSigma``; eigh's own
    autograd divides by the zero gaps and returns NaN there."""
    c, gen = 2.0, torch.Generator().manual_seed(0)
    upstream = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    sigma = (c * torch.eye(4, dtype=torch.float64)).requires_grad_()
    (inv_sqrtm(sigma) * upstream).sum().backward()
    expected = -0.5 * c**-1.5 * (upstream + upstream.T) / 2
    torch.testing.assert_close(sigma.grad, expected, rtol=1e-12, atol=1e-12)

    naive = sigma.detach().clone().requires_grad_()
    lam, u = torch.linalg.eigh(naive)
    ((u / lam.sqrt()) @ u.T * upstream).sum().backward()
    assert not torch.isfinite(naive.grad).all()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["fc", "conv"])
def test_module_gradcheck_with_groups(norm, layout):
    shape = (7, 5) if layout == "fc" else (2, 5, 2, 2)
    x = correlated(shape[0], 5, seed=5, spatial=shape[2:]).requires_grad_()
    module = build(norm, 5, layout, group_size=3)  # groups of 3 and 2
    with torch.no_grad():  # non-trivial affine parameters
        module.weight.copy_(torch.linspace(0.5, 1.5, 5))
        module.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    params = (module.weight, module.bias)
    assert torch.autograd.gradcheck(lambda x, *_: module(x), (x, *params))


@pytest.mark.parametrize("norm", NORMS)
def test_finite_gradients_with_duplicated_channels(norm):
    x = correlated(32, 6, seed=6)
    x[:, 4] = x[:, 1]
    x = x.float().requires_grad_()
    module = normzoo.build(norm, 6, "fc").train()
    loss = (module(x) * torch.linspace(-1, 1, 6)).square().sum()
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


# --- iternorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_iternorm_matches_numpy_newton_schulz(iterations):
    x = correlated(64, 6, seed=7, spatial=(2, 2))
    y = build("iternorm", 6, "conv", iterations=iterations)(x)
    expected = whiten_np(x, lambda sigma: newton_schulz_np(sigma, iterations))
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


def newton_schulz_by_autograd(sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    """The coupled iteration written plainly: autograd records every step."""
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype)
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(dim=-1)[..., None, None]
    y, z = sigma / trace, eye.expand_as(sigma)
    for _ in range(iterations):
        m = (3 * eye - z @ y) / 2
        y, z = y @ m, m @ z
    return z / trace.sqrt()


@pytest.mark.parametrize("iterations", [1, 5])
def test_newton_schulz_backward_equals_autograd_through_the_iteration(iterations):
    a = torch.randn(3, 6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigma = (a @ a.mT / 20 + 0.1 * torch.eye(6, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(3, 6, 6, dtype=torch.float64)
    w = newton_schulz_inv_sqrt(sigma, iterations)
    reference = newton_schulz_by_autograd(sigma, iterations)
    torch.testing.assert_close(w, reference, rtol=0, atol=1e-14)
    (grad,) = torch.autograd.grad((w * upstream).sum(), sigma)
    (expected,) = torch.autograd.grad((reference * upstream).sum(), sigma)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: newton_schulz_inv_sqrt(s, iterations), (sigma,))


def test_iternorm_at_30_iterations_is_exact_whitening():
    x = correlated(64, 6, seed=8)
    sigma = cov_np(channels_np(x))
    w = newton_schulz_inv_sqrt(torch.from_numpy(sigma + EPS * np.eye(6)), 30).numpy()
    np.testing.assert_allclose(w, zca_np(sigma), rtol=1e-7, atol=1e-9)
    y = build("iternorm", 6, iterations=30)(x)
    torch.testing.assert_close(y, whiten_np(x, zca_np), rtol=1e-7, atol=1e-7)


def test_iternorm_at_30_iterations_stays_finite():
    """Ill-conditioned (a duplicated channel): the uncoupled form blows up, the coupled not."""
    x = correlated(256, 16, seed=9)
    x[:, 1] = x[:, 0]
    sigma = cov_np(channels_np(x)) + EPS * np.eye(16)
    trace = np.trace(sigma)
    p = np.eye(16)
    with np.errstate(all="ignore"):
        for _ in range(30):  # the reference code's uncoupled iteration, for contrast
            p = (3 * p - p @ p @ p @ (sigma / trace)) / 2
    assert not np.isfinite(p).all() or np.abs(p).max() > 1e6

    x = x.float().requires_grad_()
    module = normzoo.build("iternorm", 16, "fc", iterations=30).train()
    y = module(x)
    (y * torch.linspace(-1, 1, 16)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


# --- both: running statistics, eval, groups ------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_eval_uses_running_statistics(norm):
    """After one step with momentum 1: running mean = batch mean, running cov = unbiased batch
    covariance, and eval output = ``W(cov_unbiased + eps I) (x - mean)``, cached until the next
    training step."""
    x, other = correlated(40, 5, seed=10), correlated(40, 5, seed=11)
    module = build(norm, 5, momentum=1.0)
    train_y = module(x)
    xm = channels_np(x)
    np.testing.assert_allclose(module.running_mean.numpy(), xm.mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(module.running_cov[0].numpy(), np.cov(xm), atol=1e-12)
    module.eval()
    eval_y = module(x)
    torch.testing.assert_close(eval_y, whiten_np(x, REFERENCE_W[norm], ddof=1))
    # unbiased running covariance: eval is train shrunk by about sqrt((m - 1) / m)
    torch.testing.assert_close(eval_y, train_y * (39 / 40) ** 0.5, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(module(other), whiten_np(other, REFERENCE_W[norm], 1, fit=x))

    module.train()(other)  # a new step invalidates the cached eval W
    module.eval()
    expected = whiten_np(x, REFERENCE_W[norm], 1, fit=other)
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("norm", NORMS)
def test_running_cov_is_an_average_of_covariances(norm):
    batches = [correlated(30, 4, seed=s) for s in (12, 13)]
    module = build(norm, 4, momentum=0.25)
    for x in batches:
        module(x)
    covs = [np.cov(channels_np(x)) for x in batches]
    expected = 0.75 * (0.75 * np.eye(4) + 0.25 * covs[0]) + 0.25 * covs[1]
    np.testing.assert_allclose(module.running_cov[0].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_groups_whiten_blocks_separately(norm):
    """20 channels, group_size 8: blocks 8, 8, 4, each whitened on its own, train and eval."""
    x = correlated(16, 20, seed=14, spatial=(2, 2))
    module = build(norm, 20, "conv", group_size=8, momentum=0.5)
    blocks = [slice(0, 8), slice(8, 16), slice(16, 20)]
    parts = [build(norm, b.stop - b.start, "conv", momentum=0.5) for b in blocks]
    expected = torch.cat([p(x[:, b]) for p, b in zip(parts, blocks, strict=True)], 1)
    torch.testing.assert_close(module(x), expected)
    assert module.running_cov.shape == (3, 8, 8)
    torch.testing.assert_close(module.running_cov[2, :4, :4], parts[2].running_cov[0])
    torch.testing.assert_close(module.running_cov[2, 4:, 4:], torch.eye(4, dtype=torch.float64))
    assert not module.running_cov[2, :4, 4:].any()
    module.eval()
    x2 = correlated(4, 20, seed=15, spatial=(2, 2))
    expected = torch.cat([p.eval()(x2[:, b]) for p, b in zip(parts, blocks, strict=True)], 1)
    torch.testing.assert_close(module(x2), expected)


@pytest.mark.parametrize("norm", NORMS)
def test_load_state_dict_refreshes_eval_cache(norm):
    source, target = build(norm, 4, momentum=1.0), build(norm, 4, momentum=1.0)
    source(correlated(20, 4, seed=16))
    x = correlated(5, 4, seed=17)
    target.eval()(x)  # caches W of the identity running covariance
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source.eval()(x), rtol=0, atol=0)


def test_iterations_option_is_validated():
    with pytest.raises(normzoo.OptionError):
        normzoo.build("iternorm", 4, "fc", iterations=0)
    assert normzoo.build("zca", 4, "fc", group_size=16).group_size == 4
