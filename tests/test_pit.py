"""`pit` (v2) against independent references: scipy's ranks for the train transform and its
mid-p values at ties, a numpy re-implementation of the documented eval function, the running
distribution function's update rule, the population transform on seven kinds of channel, and
torch operations (and autograd) for the fused CPU loops."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import special, stats

import normzoo
from normzoo_plugins.pit import kernel
from normzoo_plugins.pit.knots import slice_means
from normzoo_plugins.pit.table import KnotTable

from .pit_fidelity import BATCH_SIZES, DISTRIBUTIONS, batchnorm, fidelity

LAYOUTS = ["fc", "conv"]


def build(layout: str = "fc", num_features: int = 3, **options) -> torch.nn.Module:
    return normzoo.build("pit", num_features, layout=layout, **options).double()


def sample(shape, seed):
    """Channels of different shapes: Gaussian, exponential (skewed), bimodal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    kinds = [
        lambda v: 3 * v + 2,
        lambda v: -torch.log(torch.rand(v.shape, generator=g, dtype=v.dtype)),
        lambda v: v + 4 * torch.sign(v),
    ]
    for c in range(shape[1]):
        x[:, c] = kinds[c % 3](x[:, c])
    return x


def channels(t: torch.Tensor) -> np.ndarray:
    """Per-channel values as a ``(C, n)`` numpy array."""
    return t.detach().transpose(0, 1).reshape(t.shape[1], -1).double().numpy()


def rank_gauss(values: np.ndarray) -> np.ndarray:
    """``Phi^-1((rank - 0.5) / n)`` with average ranks: the exact PIT of the sample, whose value
    at a run of ties is its mid-p value ``(#below + #equal / 2) / n``."""
    return special.ndtri((stats.rankdata(values) - 0.5) / values.size)


# -- train mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_mode_is_close_to_the_rank_gauss_transform(layout):
    shape = (2048, 3) if layout == "fc" else (32, 3, 8, 8)
    x = sample(shape, 0)
    y = build(layout)(x)
    for got, values in zip(channels(y), channels(x), strict=True):
        assert np.abs(got - rank_gauss(values)).mean() < 0.02


def test_ties_get_their_exact_mid_p_value_in_train_mode():
    g = np.random.default_rng(1)
    relu = np.maximum(g.normal(size=4096), 0.0)
    counts = g.poisson(3.0, size=4096).astype(float)
    x = torch.tensor(np.stack([relu, counts], axis=1))
    y = channels(build("fc", 2)(x))
    for got, values in zip(y, channels(x), strict=True):
        expected = rank_gauss(values)
        atoms, sizes = np.unique(values, return_counts=True)
        for atom in atoms[sizes > 2 * values.size / 64]:  # holds a whole slice of the knots
            tied = values == atom
            np.testing.assert_allclose(got[tied], expected[tied], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["exponential", "lognormal", "bimodal", "student-t2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_output_is_standard_normal_on_hard_channels(name, layout):
    """The issue's quality bar, on fc and on conv input larger than the knot sample."""
    g = np.random.default_rng(2)
    draw = DISTRIBUTIONS[name][0]
    if layout == "fc":
        x = torch.tensor(np.stack([draw(g, 4096) for _ in range(2)], axis=1))
    else:
        x = torch.tensor(np.stack([draw(g, 32 * 256) for _ in range(2)])).reshape(2, 32, 16, 16)
        x = x.transpose(0, 1).contiguous()
    for values in channels(build(layout, 2)(x)):
        assert abs(values.mean()) < 0.02
        assert 0.97 <= values.std() <= 1.03
        assert abs(stats.skew(values)) < 0.1


@pytest.mark.parametrize("train", [True, False])
def test_output_preserves_order_within_each_channel(train):
    module = build("conv")
    x = sample((8, 3, 5, 5), 3)
    module(x)
    module.train(train)
    x = torch.cat([x, 10 * sample((8, 3, 5, 5), 4)])  # far outside the knots too
    for got, values in zip(channels(module(x)), channels(x), strict=True):
        order = np.argsort(values, kind="stable")
        assert np.all(np.diff(got[order]) >= -1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_output_is_invariant_to_a_positive_affine_change_of_the_input(layout):
    x = sample((512, 3) if layout == "fc" else (8, 3, 8, 8), 2)
    scale = torch.tensor([250.0, 0.01, 3.0], dtype=torch.float64)
    shift = torch.tensor([-7.0, 1e3, 0.5], dtype=torch.float64)
    view = (1, 3) + (1,) * (x.dim() - 2)
    changed = x * scale.reshape(view) + shift.reshape(view)
    torch.testing.assert_close(build(layout)(changed), build(layout)(x), rtol=0, atol=1e-8)


def test_delta_bounds_the_output_and_defaults_to_half_a_rank():
    x = sample((64, 3), 5)
    y = build("fc")(x)
    assert y.abs().max() <= -special.ndtri(0.5 / 64) + 1e-12
    module = build("fc", delta=0.05)
    module(x)
    module.eval()
    assert module(1e6 * x).abs().max() <= -special.ndtri(0.05) + 1e-12


def test_extreme_values_stay_finite_forward_and_backward():
    for dtype in (torch.float32, torch.float64):
        x = sample((64, 3), 6).to(dtype)
        x[0, 0], x[1, 1], x[:5, 2] = 1e30, -1e30, 7.0  # outliers and ties
        module = normzoo.build("pit", 3, layout="fc").to(dtype)
        for train in (True, False):
            module.train(train)
            xg = x.clone().requires_grad_(True)
            y = module(xg)
            y.square().sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(xg.grad).all()


def test_gradcheck_with_knots_from_a_strided_sample():
    module = build("fc", 2, num_knots=8, sample_size=64)
    x = sample((100, 2), 7).requires_grad_(True)  # 100 values: every 2nd one makes the knots
    assert torch.autograd.gradcheck(module, (x,))
    module.eval()
    assert torch.autograd.gradcheck(module, (x,))


# -- eval mode: the documented function, computed independently ----------------------------------


def knot_limits(t, knots, low, high):
    """``Phi^-1(F(t-))``, ``Phi^-1(F(t+))`` of one channel's knot table, written from the
    docs: probit-linear between knots, the two limits at a knot, linear tails."""
    k = len(knots)

    def slope(rise, run):
        return rise / run if run > 0 else 0.0

    j_lo = np.searchsorted(knots, knots[0], side="right").clip(max=k - 1)
    j_hi = (np.searchsorted(knots, knots[-1]) - 1).clip(min=0)
    s_lo = slope(low[j_lo] - high[0], knots[j_lo] - knots[0])
    s_hi = slope(low[-1] - high[j_hi], knots[-1] - knots[j_hi])
    segment = np.searchsorted(knots, t, side="right")
    if segment == 0:
        y = low[0] + (t - knots[0]) * s_lo
        return y, y
    if segment == k and t != knots[-1]:
        y = high[-1] + (t - knots[-1]) * s_hi
        return y, y
    origin = knots[segment - 1]
    if t == origin:
        run = np.flatnonzero(knots == origin)
        middle = (run[0] + run[-1]) // 2
        return low[middle], high[middle]
    y = high[segment - 1] + (t - origin) * slope(
        low[segment] - high[segment - 1], knots[segment] - origin
    )
    return y, y


def eval_reference(x, knots, below, at_or_below, delta, cells):
    """One channel's eval output: the knot transform tabulated on ``cells`` cells between the
    outer knots and interpolated linearly, atoms at their mid-p value, clipped."""
    low = special.ndtri(np.clip(below, delta, 1 - delta))
    high = special.ndtri(np.clip(at_or_below, delta, 1 - delta))
    lowest, highest = knots[0], knots[-1]
    width = (highest - lowest) / cells
    limit = -special.ndtri(delta)
    atoms = {v for v in knots if np.sum(knots == v) > 1}
    out = []
    for value in x:
        if value in atoms:
            run = np.flatnonzero(knots == value)
            middle = (run[0] + run[-1]) // 2
            p = (below[middle] + at_or_below[middle]) / 2
            out.append(special.ndtri(np.clip(p, delta, 1 - delta)))
            continue
        if value < lowest or value >= highest:
            y = knot_limits(value, knots, low, high)[0]
        else:
            cell = min(int((value - lowest) // width), cells - 1)
            left_edge, right_edge = lowest + cell * width, lowest + (cell + 1) * width
            start = knot_limits(left_edge, knots, low, high)[1]
            end = knot_limits(right_edge, knots, low, high)[0]
            y = start + (value - left_edge) * (end - start) / width
        out.append(np.clip(y, -limit, limit))
    return np.array(out)


@pytest.mark.parametrize("kind", ["continuous", "atoms"])
def test_eval_equals_the_documented_function(kind):
    g = np.random.default_rng(8)
    module = build("fc", 2, num_knots=16)
    for _ in range(5):
        if kind == "continuous":
            x = np.stack([g.normal(1, 2, 512), g.exponential(1, 512)], axis=1)
        else:
            x = np.stack([np.maximum(g.normal(size=512), 0), g.poisson(2, 512)], axis=1)
        module(torch.tensor(x.astype(float)))
    module.eval()
    fresh = np.stack([g.normal(1, 3, 400), g.exponential(2, 400)], axis=1)
    if kind == "atoms":
        fresh = np.stack([np.maximum(g.normal(size=400), 0), g.poisson(2, 400)], axis=1)
    fresh = np.concatenate([fresh, 50 * g.normal(size=(20, 2))])  # tails
    y = module(torch.tensor(fresh)).detach().numpy()
    for c in range(2):
        expected = eval_reference(
            fresh[:, c],
            module.running_knots[c].numpy(),
            module.running_below[c].numpy(),
            module.running_at_or_below[c].numpy(),
            module.delta,
            module.cells,
        )
        np.testing.assert_allclose(y[:, c], expected, rtol=0, atol=1e-9)


# -- running statistics --------------------------------------------------------------------------


def counts_at(values: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = values.size
    below = np.array([(values < p).sum() / n for p in points])
    return below, np.array([(values <= p).sum() / n for p in points])


def test_the_first_batch_sets_the_running_table():
    x = sample((512, 3), 9)
    module = build("fc")
    module(x)
    for c, values in enumerate(channels(x)):
        expected_knots = slice_means(torch.tensor(np.sort(values))[None], 64)[0].numpy()
        np.testing.assert_allclose(module.running_knots[c].numpy(), expected_knots, atol=1e-12)
        below, at_or_below = counts_at(values, expected_knots)
        np.testing.assert_allclose(module.running_below[c].numpy(), below, atol=1e-12)
        np.testing.assert_allclose(module.running_at_or_below[c].numpy(), at_or_below, atol=1e-12)


def test_the_running_distribution_function_averages_the_batches_at_the_knots():
    """Until their pending average has half the weight, the knots stay; the distribution
    function at them follows torch's momentum rule with the batch's empirical one."""
    first, second = sample((512, 3), 10), sample((512, 3), 11) * 1.5
    module = build("fc", momentum=0.2)
    module(first)
    knots = module.running_knots.clone()
    previous = module.running_below.clone()
    module(second)
    assert torch.equal(module.running_knots, knots)  # 0.8 of the weight is still the old one
    for c, values in enumerate(channels(second)):
        below, _ = counts_at(values, knots[c].numpy())
        expected = 0.8 * previous[c].numpy() + 0.2 * below
        np.testing.assert_allclose(module.running_below[c].numpy(), expected, atol=1e-12)


def test_small_batches_are_pooled_before_the_knots_move():
    module = build("fc", 1, momentum=0.1)
    g = np.random.default_rng(12)
    batches = [torch.tensor(g.normal(size=(16, 1))) for _ in range(17)]
    module(batches[0])
    placed = module.running_knots.clone()
    for batch in batches[1:16]:
        module(batch)
        assert torch.equal(module.running_knots, placed)  # 16 values: pooled, not placed
    module(batches[16])  # 256 pooled values: the knots move
    assert not torch.equal(module.running_knots, placed)


# -- eval fidelity: the population transform ------------------------------------------------------


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_eval_output_matches_the_population_transform(name, batch):
    """docs/norms/pit.md's table: within 0.05 mean absolute error of ``Phi^-1(F(x))`` (mid-p at
    atoms) on every kind of channel and batch size, output std 0.95-1.05 on a Gaussian."""
    error, std = fidelity(
        lambda momentum: normzoo.build("pit", 2, "fc", momentum=momentum), name, batch
    )
    assert error < 0.05
    if name == "gaussian":
        assert 0.95 <= std <= 1.05
        yardstick, _ = fidelity(batchnorm, name, batch, target=lambda x: (x - 2.0) / 3.0)
        assert error < 3 * yardstick  # sampling noise alone costs batch norm this much


# -- options and the interface ------------------------------------------------------------------


def test_options_are_declared_and_checked():
    names = [option.name for option in normzoo.info("pit").options]
    assert names == ["num_knots", "sample_size", "delta", "momentum", "affine", "sync"]
    assert normzoo.info("pit").version == "2"
    with pytest.raises(normzoo.OptionError):
        normzoo.build("pit", 3, layout="fc", num_knots=1)
    with pytest.raises(normzoo.OptionError):
        normzoo.build("pit", 3, layout="fc", delta=1e-9)


def test_batch_of_one_is_rejected_in_train_and_accepted_in_eval():
    module = build("fc")
    with pytest.raises(normzoo.BatchSizeError):
        module(torch.randn(1, 3, dtype=torch.float64))
    module.eval()
    assert module(torch.randn(1, 3, dtype=torch.float64)).shape == (1, 3)


@pytest.mark.parametrize("n", [7, 50])
def test_knots_are_slice_means_of_the_interpolated_quantile_function(n):
    values = np.sort(np.random.default_rng(n).standard_normal(n))
    k, fine = 16, 160_000
    u = (np.arange(fine) + 0.5) / fine  # midpoint rule, 10,000 points per slice
    expected = np.quantile(values, u).reshape(k, -1).mean(axis=1)
    got = slice_means(torch.tensor(values)[None], k)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


def test_a_pit_v1_state_dict_converts_to_the_same_distribution_function():
    """Version 2 state dicts held standardized knots ``z_k`` at ``p_k``: the conversion keeps
    every knot's probability and puts it at ``mean + sqrt(var + eps) z_k``."""
    module = build("fc", 2, num_knots=4)
    z = torch.tensor([[-1.0, -0.2, 0.3, 1.1], [-2.0, -1.0, 0.0, 3.0]], dtype=torch.float64)
    old = {
        "weight": torch.ones(2), "bias": torch.zeros(2), "num_batches_tracked": torch.tensor(3),
        "running_mean": torch.tensor([1.0, -2.0]), "running_var": torch.tensor([4.0, 0.25]),
        "running_knots": z,
    }  # fmt: skip
    state = module.state_dict()
    state.update(old)
    for key in ("running_below", "running_at_or_below"):
        del state[key]
    state._metadata[""]["version"] = 2
    module.load_state_dict(state)
    scale = torch.sqrt(torch.tensor([4.0, 0.25], dtype=torch.float64) + 1e-5).unsqueeze(1)
    expected = torch.tensor([[1.0], [-2.0]], dtype=torch.float64) + scale * z
    torch.testing.assert_close(module.running_knots, expected)
    p = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64).expand(2, -1)
    torch.testing.assert_close(module.running_below, p)
    torch.testing.assert_close(module.running_at_or_below, p)


# -- the fused CPU loops against the same function in torch operations -------------------------


def run_both_paths(monkeypatch, layout, dtype, x, upstream):
    """Train output, input and parameter gradients, and eval output on ``1.3 x`` (a NaN in
    it), once through the fused loops and once through torch operations."""
    results = []
    for fused in (True, False):
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(kernel, "supports", lambda values: False)
            torch.manual_seed(1)
            module = normzoo.build("pit", x.shape[-1 if layout == "seq" else 1], layout=layout)
            module = module.to(dtype)
            x_grad = x.detach().clone().requires_grad_()
            y = module(x_grad)
            y.backward(upstream)
            module.eval()
            fresh = 1.3 * x.detach()
            fresh.view(-1)[0] = float("nan")
            results.append((y.detach(), x_grad.grad, module.weight.grad, module(fresh).detach()))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["fc", "conv", "seq"])
def test_fused_loops_compute_the_torch_operations_function(monkeypatch, layout, dtype):
    shape = {"fc": (256, 5), "conv": (16, 3, 6, 6), "seq": (8, 12, 4)}[layout]
    g = torch.Generator().manual_seed(5)
    x = (2 * torch.randn(shape, generator=g) + 1).to(dtype)
    x.view(-1)[::7] = 0.5  # an atom in every channel
    x.view(-1)[3], x.view(-1)[5] = 1e4, -1e4  # far tails
    upstream = torch.randn(shape, generator=g).to(dtype)
    fused, reference = run_both_paths(monkeypatch, layout, dtype, x, upstream)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for got, expected in zip(fused, reference, strict=True):
        assert torch.equal(got.isnan(), expected.isnan())
        scale = expected.nan_to_num().abs().max().clamp_min(1)
        assert (got - expected).nan_to_num().abs().max() <= tolerance * scale


def knot_table(kind: str, channels: int = 3, k: int = 16) -> KnotTable:
    g = torch.Generator().manual_seed(2)
    knots = torch.randn(channels, k, generator=g, dtype=torch.float64).sort(dim=1).values
    if kind == "atoms":  # runs of ties inside, at the lowest and at the highest knot
        knots[0, 3:8] = knots[0, 3]
        knots[1, :5] = knots[1, 0]
        knots[2, -4:] = knots[2, -1]
    below = torch.rand(channels, k, generator=g, dtype=torch.float64).sort(dim=1).values * 0.9
    tied = torch.cat([knots[:, 1:] == knots[:, :-1], torch.zeros(channels, 1, dtype=bool)], 1)
    at_or_below = below + 0.02 * tied
    return KnotTable(knots.requires_grad_(), below + 0.05, at_or_below + 0.05, 1e-3)


@pytest.mark.parametrize("cells", [8, 64])
@pytest.mark.parametrize("kind", ["continuous", "atoms"])
def test_fused_cell_table_and_its_backward_equal_autograd_of_the_torch_operations(kind, cells):
    table = knot_table(kind)
    fused = kernel.cell_table(table.knots, table.low, table.high, table.run_middle, cells)
    reference = table._cell_table(cells)
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in reference]
    gradients = []
    for intercept, slope in (fused, reference):
        torch.testing.assert_close(intercept, reference[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(slope, reference[1], rtol=0, atol=1e-12)
        loss = (intercept * upstream[0]).sum() + (slope * upstream[1]).sum()
        gradients.append(torch.autograd.grad(loss, table.knots)[0])
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-10, atol=1e-10)
    if kind == "continuous":  # with ties, a finite difference breaks them: no derivative there
        knots = table.knots.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda k: kernel.cell_table(k, table.low, table.high, table.run_middle, cells),
            (knots,),
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("right", [False, True])
def test_merge_search_equals_torch_searchsorted(right, dtype):
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(0, 20, (5, 40), generator=g).to(dtype).sort(dim=1).values  # ties
    points = torch.randint(-2, 23, (5, 30), generator=g).to(dtype).sort(dim=1).values
    expected = torch.searchsorted(rows, points, right=right)
    assert torch.equal(kernel.searchsorted(rows, points, right=right), expected)


def test_knots_are_sorted_next_to_a_run_of_ties_despite_rounding():
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-5 * torch.randn(2000, 64, generator=g, dtype=torch.float64)
    x[:700] = x[0]  # an atom in every channel, far from zero: the running sums round
    knots = slice_means(x.t().sort(dim=1).values, 64)
    assert (knots[:, 1:] >= knots[:, :-1]).all()


@pytest.mark.parametrize("right", [False, True])
def test_merge_search_falls_back_to_torch_for_unsorted_points_and_nan(right):
    rows = torch.tensor([[0.0, 1.0, 1.0, 2.0, 3.0]] * 2, dtype=torch.float64)
    points = torch.tensor([[2.5, 0.5, 1.0], [0.5, float("nan"), 1.0]], dtype=torch.float64)
    expected = torch.searchsorted(rows, points, right=right)
    assert torch.equal(kernel.searchsorted(rows, points, right=right), expected)


def test_eval_with_gradients_after_an_inference_mode_pass():
    module = build("conv", 3)
    module(sample((8, 3, 4, 4), 1))
    module.eval()
    with torch.inference_mode():
        module(sample((8, 3, 4, 4), 2))  # fills the eval cache with inference tensors
    x = sample((8, 3, 4, 4), 3).requires_grad_()
    module(x).sum().backward()  # a saliency map, say
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.skipif(kernel.numba is None, reason="numba is not installed")
def test_numbas_thread_pool_is_sized_to_the_process_share_of_the_cores():
    """A pool of the machine's cores in a process given one thread made a training step 20x
    slower when other processes shared the cores (see the kernel's docstring). The pool takes
    torch's thread count, and the environment then names the pool's size: numba reads it again
    at every compilation and refuses a size that changed (launchers set it for children)."""
    code = (
        "import os, torch; torch.set_num_threads(1); "
        "from normzoo_plugins.pit import kernel; "
        "print(torch.get_num_threads(), kernel.numba.config.NUMBA_NUM_THREADS, "
        "kernel.POOL_THREADS, os.environ.get('NUMBA_NUM_THREADS'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.split() == ["1", "1", "1", "1"]
    given = subprocess.run([sys.executable, "-c", code], env=env | {"NUMBA_NUM_THREADS": "2"},
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert given.split() == ["1", "2", "2", "2"]
