"""`pit` against independent numpy/scipy references (hard ranks, eval interpolation, running
statistics), its invariances and gradients, and its behaviour on extreme values and ties."""

import numpy as np
import pytest
import torch
from scipy import special, stats

import normzoo
from normzoo_plugins import pit

SHAPES = {"fc": (64, 3), "conv": (4, 3, 5, 5)}
LAYOUTS = ["fc", "conv"]
SMOOTH = ["adaptive", "fixed"]


def build(layout, num_features=3, dtype=torch.float64, **options):
    return normzoo.build("pit", num_features, layout=layout, **options).to(dtype)


def sample(shape, seed, dtype=torch.float64):
    """Channels of different shapes: Gaussian, exponential (skewed), bimodal, repeating."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    kinds = [
        lambda v: 3 * v + 2,
        lambda v: -torch.log(torch.rand(v.shape, generator=g, dtype=v.dtype)),
        lambda v: v + 4 * torch.sign(v),
    ]
    for c in range(shape[1]):
        x[:, c] = kinds[c % 3](x[:, c])
    return x.to(dtype)


def channels(t):
    """Per-channel values as a ``(C, n)`` numpy array."""
    return t.detach().transpose(0, 1).reshape(t.shape[1], -1).double().numpy()


def probit_limit(delta):
    return -special.ndtri(delta)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hard_mode_equals_probit_of_scipy_average_ranks(layout):
    x = sample(SHAPES[layout], 0)
    x[:, 0] = torch.round(x[:, 0])  # many ties
    y = build(layout, smoothing="hard").train()(x)
    for got, values in zip(channels(y), channels(x), strict=True):
        expected = special.ndtri((stats.rankdata(values) - 0.5) / values.size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_equals_np_interp_of_knots_then_probit(layout):
    delta, k = 1e-3, 8
    module = build(layout, num_knots=k, momentum=0.5, delta=delta)
    for seed in range(5):
        module(sample(SHAPES[layout], seed))
    module.eval()
    x = sample(SHAPES[layout], 99) * 1.5
    x[0, :] = 1e3  # far beyond the knots: clipped
    y = module(x)
    mean, var = module.running_mean.numpy(), module.running_var.numpy()
    knots, p = module.running_knots.numpy(), (np.arange(k) + 0.5) / k
    assert np.all(np.diff(knots, axis=1) >= 0)
    y_knots = special.ndtri(p)
    regions = np.zeros(3, dtype=bool)  # some values below, inside and above the knots
    for c, (got, values) in enumerate(zip(channels(y), channels(x), strict=True)):
        z = (values - mean[c]) / np.sqrt(var[c] + 1e-5)
        kc = knots[c]
        inside = special.ndtri(np.clip(np.interp(z, kc, p), delta, 1 - delta))
        below = y_knots[0] + (z - kc[0]) * (y_knots[1] - y_knots[0]) / (kc[1] - kc[0])
        above = y_knots[-1] + (z - kc[-1]) * (y_knots[-1] - y_knots[-2]) / (kc[-1] - kc[-2])
        expected = np.where(z < kc[0], below, np.where(z > kc[-1], above, inside))
        expected = np.clip(expected, -probit_limit(delta), probit_limit(delta))
        regions |= [(z < kc[0]).any(), ((z > kc[0]) & (z < kc[-1])).any(), (z > kc[-1]).any()]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert regions.all()


def test_running_statistics_follow_torch_momentum_convention():
    k, m = 16, 0.25
    module = build("conv", num_knots=k, momentum=m)
    p = (np.arange(k) + 0.5) / k
    initial = special.ndtri(p)
    np.testing.assert_allclose(module.running_knots.numpy(), np.tile(initial, (3, 1)), atol=1e-6)
    x = sample(SHAPES["conv"], 1)
    module(x)
    for c, values in enumerate(channels(x)):
        z = (values - values.mean()) / np.sqrt(values.var() + 1e-5)
        knots = (1 - m) * initial + m * np.quantile(z, p)
        np.testing.assert_allclose(module.running_knots[c].numpy(), knots, atol=1e-6)
        assert module.running_mean[c].item() == pytest.approx(m * values.mean(), abs=1e-12)
        expected_var = (1 - m) + m * values.var(ddof=1)
        assert module.running_var[c].item() == pytest.approx(expected_var, abs=1e-12)
    assert module.num_batches_tracked.item() == 1


@pytest.mark.parametrize("smoothing", [*SMOOTH, "hard"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_output_is_invariant_to_positive_affine_input_change(layout, smoothing):
    module = build(layout, smoothing=smoothing, eps=1e-300)  # eps > 0, negligible
    x = sample(SHAPES[layout], 2)
    scale = torch.tensor([250.0, 0.01, 3.0], dtype=torch.float64)
    shift = torch.tensor([-7.0, 1e3, 0.5], dtype=torch.float64)
    view = (1, 3) + (1,) * (x.dim() - 2)
    changed = x * scale.reshape(view) + shift.reshape(view)
    torch.testing.assert_close(module(changed), module(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("smoothing", SMOOTH)
def test_preserves_order_within_each_channel_in_train_and_eval(smoothing):
    module = build("conv", smoothing=smoothing)
    x = sample(SHAPES["conv"], 3)
    for training in (True, False):
        module.train(training)
        if not training:  # add values far outside the knots
            x = torch.cat([x, sample(SHAPES["conv"], 4) * 10])
        y = module(x)
        for got, values in zip(channels(y), channels(x), strict=True):
            ranked = got[np.argsort(values, kind="stable")]
            assert np.all(np.diff(ranked) >= 0)
            unclipped = np.abs(ranked) < probit_limit(1e-6) - 1e-9
            assert np.all(np.diff(ranked[unclipped]) > 0) and unclipped.mean() >= 0.5


@pytest.mark.parametrize("smoothing", SMOOTH)
def test_gaussian_input_comes_back_close_to_its_standardized_self(smoothing):
    x = 3 * torch.randn(4096, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x + 5
    module = build("fc", 2, smoothing=smoothing)
    y = module(x)
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    core = z.abs() < 2
    assert (y - z)[core].abs().max() < 0.15
    assert (y - z).abs().mean() < 0.03
    # eval of an untrained module: interpolating Phi between its own quantiles, tails exact
    fresh = build("fc", 2).eval()
    grid = torch.linspace(-4.5, 4.5, 900, dtype=torch.float64).reshape(-1, 2)
    assert (fresh(grid) - grid / np.sqrt(1 + 1e-5)).abs().max() < 0.06


def test_delta_clips_probabilities_and_defaults_to_half_a_rank():
    x = sample(SHAPES["fc"], 6)
    n = SHAPES["fc"][0]
    hard = build("fc", smoothing="hard")(x)
    assert hard.abs().max().item() == pytest.approx(probit_limit(0.5 / n), abs=1e-9)
    for smoothing in [*SMOOTH, "hard"]:
        y = build("fc", smoothing=smoothing, delta=0.05)(x)
        assert y.abs().max().item() <= probit_limit(0.05) + 1e-9


@pytest.mark.parametrize("smoothing", SMOOTH)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64_train_and_eval(layout, smoothing):
    module = build(layout, 2, smoothing=smoothing, num_knots=8)
    shape = {"fc": (10, 2), "conv": (2, 2, 2, 3)}[layout]
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.5, -0.7]))
        for seed in range(3):
            module(sample(shape, 10 + seed))
    x = sample(shape, 20).requires_grad_(True)
    for training in (True, False):
        module.train(training)
        assert torch.autograd.gradcheck(module, (x,)), f"{layout} {smoothing} {training}"


def test_kernel_tail_gradients_across_chunks(monkeypatch):
    monkeypatch.setattr(pit, "CHUNK_ELEMENTS", 16)  # several chunks per row
    g = torch.Generator().manual_seed(7)
    t = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    anchors = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    widths = (0.2 + torch.rand(2, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    sign = torch.where(torch.rand(2, 9, generator=g) < 0.5, -1.0, 1.0).double()
    tail = pit._KernelTail.apply(t, anchors, widths, sign)
    w = (t[:, :, None] - anchors[:, None, :]) / widths[:, None, :]
    expected = special.ndtr(sign[:, :, None].numpy() * w.detach().numpy()).mean(axis=2)
    np.testing.assert_allclose(tail.detach().numpy(), expected, rtol=1e-12, atol=1e-15)
    fn = pit._KernelTail.apply
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, sign), (t, anchors, widths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smoothing", [*SMOOTH, "hard"])
def test_extreme_values_and_ties_stay_finite_forward_and_backward(smoothing, dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    x[0, 0, 0, 0], x[1, 0, 1, 1], x[2, 0, 2, 2] = 1e30, -1e30, 1e30
    x[:, 1] = 3.0  # one value for the whole channel
    x[:, 2] = torch.randint(-2, 3, (64, 4, 4), generator=g).double()  # five values only
    x = x.to(dtype).requires_grad_(True)
    module = build("conv", dtype=dtype, smoothing=smoothing)
    y = module(x)
    y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype))
    assert torch.isfinite(y).all()
    assert x.grad is None if smoothing == "hard" else torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    ties = channels(y)[2]
    for value in range(-2, 3):  # duplicates share their output
        assert np.ptp(ties[channels(x)[2] == value]) < 1e-4
    if dtype == torch.float64:  # float32 squares of 1e30 overflow the variance
        assert y[0, 0, 0, 0] == y[:, 0].max() and y[1, 0, 1, 1] == y[:, 0].min()
        assert all(torch.isfinite(b).all() for b in module.buffers())
    module.eval()
    far = torch.tensor([1e30, -1e30, 1e6, -1e6, 0.0], dtype=torch.float64)
    x_eval = far.repeat(3, 3, 1).permute(2, 0, 1)[..., None].to(dtype).requires_grad_(True)
    y_eval = module(x_eval)
    y_eval.sum().backward()
    assert torch.isfinite(y_eval).all() and torch.isfinite(x_eval.grad).all()
    assert y_eval.abs().max().item() <= probit_limit(1e-6) + 1e-5


def test_float32_upper_tail_from_the_complementary_sum():
    g = torch.Generator().manual_seed(9)
    half = torch.randn(50_000, 1, generator=g, dtype=torch.float64).exp()  # long upper tail
    x = torch.cat([half, -half])  # symmetric: y must be odd
    y32 = build("fc", 1, dtype=torch.float32)(x.float()).double()
    y64 = build("fc", 1)(x)
    assert (y32 - y64).abs().max() < 1e-5  # 1e-3 from 1 - F in float32
    torch.testing.assert_close(y32[:50_000], -y32[50_000:], rtol=0, atol=1e-5)


def test_batch_of_one_is_rejected_in_train_and_accepted_in_eval():
    module = build("fc")
    with pytest.raises(normzoo.BatchSizeError):
        module(torch.randn(1, 3, dtype=torch.float64))
    module.eval()
    assert module(torch.randn(1, 3, dtype=torch.float64)).shape == (1, 3)


def test_options_are_declared_and_checked():
    names = [option.name for option in normzoo.info("pit").options]
    assert names == ["num_knots", "smoothing", "bandwidth", "delta", "momentum", "eps", "affine"]
    with pytest.raises(normzoo.OptionError):
        normzoo.build("pit", 3, layout="fc", smoothing="soft")
    with pytest.raises(normzoo.OptionError):
        normzoo.build("pit", 3, layout="fc", delta=1e-9)


@pytest.mark.parametrize("n", [7, 50])
def test_anchors_are_slice_means_of_the_interpolated_quantile_function(n):
    values = np.sort(np.random.default_rng(n).standard_normal(n))
    k, fine = 16, 160_000
    u = (np.arange(fine) + 0.5) / fine  # midpoint rule, 10,000 points per slice
    expected = np.quantile(values, u).reshape(k, -1).mean(axis=1)
    got = pit.slice_means(torch.tensor(values)[None], k)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
