"""`batchrenorm`, `ghostbn` and `frozenbn` against independent references in float64.

- `batchrenorm`: the paper's Algorithm 1 written out below with plain tensor ops (r and d
  detached); torch's batch norm when ``r_max = 1, d_max = 0`` and during the warmup.
- `ghostbn`: torch's own batch norm module called on each virtual batch in turn
  (``x.split(virtual_batch_size)``), running statistics and ``num_batches_tracked`` included.
- `frozenbn`: ``torchvision.ops.FrozenBatchNorm2d``, in train and eval, state dicts both ways;
  ``normzoo.convert(model, "frozenbn")`` on a trained torchvision resnet18.
- Under torch.distributed (two gloo processes, the fixture of tests/test_distributed.py with
  its worker's training step): `batchrenorm` and `ghostbn` equal one process on the same
  global batch.
"""

from __future__ import annotations

import datetime
import inspect
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torch.nn import functional as F

import normzoo
from normzoo.base import cumulative_running_stats
from normzoo.layouts import LAYOUT_NAMES, get_layout
from normzoo.testing import CONFORMANCE_CHECKS, run_check
from tests import distributed_worker as worker

C = 5
SHAPES = {
    "fc": (22, C),
    "conv1d": (6, C, 7),
    "conv": (6, C, 4, 3),
    "conv3d": (5, C, 2, 3, 2),
    "seq": (6, 7, C),
}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def batch(layout: str, step: int, size: int | None = None) -> torch.Tensor:
    """A float64 batch whose channels have their own means and spreads, changing with the step
    (so that the running statistics lag, and r and d are not 1 and 0)."""
    shape = list(SHAPES[layout])
    if size is not None:
        shape[0] = size
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    channel = get_layout(layout).channel_shape(C)
    spread = torch.linspace(0.3, 3.0, C, dtype=torch.float64).reshape(channel) * (1 + step % 3)
    centre = torch.linspace(-2.0, 2.0, C, dtype=torch.float64).reshape(channel) * (step - 1)
    return x * spread + centre


def build(norm: str, layout: str, **options) -> nn.Module:
    torch.manual_seed(0)
    module = normzoo.build(norm, C, layout, **options).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand(parameter.shape, dtype=torch.float64) + 0.5)
    return module


def channels_first(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The input as torch's batch norms take it: ``(N, L, C)`` becomes ``(N, C, L)``."""
    return x.transpose(1, 2) if layout == "seq" else x


def assert_close(actual, expected, what, tolerance=1e-10):
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=what)


# -- registration ------------------------------------------------------------------------------


def test_the_three_norms_are_registered_with_their_options_and_defaults():
    declared = {
        name: {option.name: option.default for option in normzoo.info(name).options}
        for name in ("batchrenorm", "ghostbn", "frozenbn")
    }
    assert declared == {
        "batchrenorm": {
            "eps": 1e-5, "momentum": 0.1, "r_max": 3.0, "d_max": 5.0, "warmup": 0,
            "affine": True, "sync": True,
        },
        "ghostbn": {
            "virtual_batch_size": 32, "eps": 1e-5, "momentum": 0.1, "affine": True, "sync": True
        },
        "frozenbn": {"eps": 1e-5},
    }  # fmt: skip
    for name in declared:
        info = normzoo.info(name)
        assert info.layouts == LAYOUT_NAMES and info.plugin == "batch-variants"
        assert info.uses_batch_stats is (name != "frozenbn")
    torchvision_eps = inspect.signature(torchvision.ops.FrozenBatchNorm2d).parameters["eps"]
    assert torchvision_eps.default == normzoo.info("frozenbn").options[0].default


@pytest.mark.parametrize(
    "norm, option, value, bound",
    [
        ("batchrenorm", "r_max", 0.5, 1.0),
        ("batchrenorm", "d_max", -1.0, 0.0),
        ("batchrenorm", "warmup", -1, 0),
        ("ghostbn", "virtual_batch_size", 1, 2),
    ],
)
def test_bad_options_are_one_line_naming_the_value(norm, option, value, bound):
    with pytest.raises(normzoo.OptionError) as caught:
        normzoo.build(norm, C, "fc", **{option: value})
    assert str(caught.value) == (
        f"option {option!r} of norm {norm!r} must be >= {bound}, got {value}"
    )


# -- the conformance suite with options beyond the defaults --------------------------------------
# (tests/test_conformance.py runs every check with the default options over every norm)

CONFIGURED = [
    ("batchrenorm", {"warmup": 10**6}),  # plain batch norm throughout: gradcheck applies
    ("batchrenorm", {"r_max": 1.0, "d_max": 0.0, "momentum": None, "affine": False}),
    ("ghostbn", {"virtual_batch_size": 2}),  # several virtual batches in every check
    ("ghostbn", {"virtual_batch_size": 4, "momentum": None}),  # a smaller last one (fc: 4 + 2)
    ("frozenbn", {"eps": 1e-3}),
]


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
@pytest.mark.parametrize("norm, options", CONFIGURED, ids=lambda value: str(value))
def test_conforms_with_options(norm, options, check):
    run_check(check, norm, options=options)


# -- batchrenorm ---------------------------------------------------------------------------------


class Algorithm1:
    """Batch Renormalization, Algorithm 1 of Ioffe 2017, in plain tensor ops: the reference.

    The moving averages are those the issue asks for (and batch norm keeps): the mean and the
    unbiased variance with torch's momentum convention (the paper averages sigma itself).
    """

    def __init__(self, layout, r_max, d_max, eps=1e-5, momentum=0.1, warmup=0):
        self.dims = get_layout(layout).reduce_dims
        self.r_max, self.d_max, self.eps, self.momentum, self.warmup = (
            r_max, d_max, eps, momentum, warmup
        )  # fmt: skip
        shape = get_layout(layout).channel_shape(C)
        self.mu = torch.zeros(shape, dtype=torch.float64)
        self.var = torch.ones(shape, dtype=torch.float64)
        self.steps = 0
        self.clipped = self.unclipped = 0

    def train(self, x, gamma, beta):
        mu_b = x.mean(dim=self.dims, keepdim=True)
        sigma_b = torch.sqrt(((x - mu_b) ** 2).mean(dim=self.dims, keepdim=True) + self.eps)
        sigma = torch.sqrt(self.var + self.eps)
        if self.steps < self.warmup:
            r, d = torch.ones_like(sigma), torch.zeros_like(sigma)
        else:
            raw_r = (sigma_b / sigma).detach()
            raw_d = ((mu_b - self.mu) / sigma).detach()
            r = torch.clamp(raw_r, 1 / self.r_max, self.r_max)
            d = torch.clamp(raw_d, -self.d_max, self.d_max)
            at_clip = (r != raw_r) | (d != raw_d)
            self.clipped += int(at_clip.sum())
            self.unclipped += int((~at_clip).sum())
        x_hat = (x - mu_b) / sigma_b * r + d
        y = gamma.reshape(self.mu.shape) * x_hat + beta.reshape(self.mu.shape)
        m = x.numel() // C
        batch_var = ((x - mu_b) ** 2).sum(dim=self.dims, keepdim=True).detach() / (m - 1)
        self.mu = self.mu + self.momentum * (mu_b.detach() - self.mu)
        self.var = self.var + self.momentum * (batch_var - self.var)
        self.steps += 1
        return y

    def eval(self, x, gamma, beta):
        x_hat = (x - self.mu) / torch.sqrt(self.var + self.eps)
        return gamma.reshape(self.mu.shape) * x_hat + beta.reshape(self.mu.shape)


@pytest.mark.parametrize("clips", [(3.0, 5.0), (1.5, 0.5)], ids=["defaults", "tight-clips"])
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_batchrenorm_equals_algorithm_1(layout, clips):
    r_max, d_max = clips
    ours = build("batchrenorm", layout, r_max=r_max, d_max=d_max)
    reference = Algorithm1(layout, r_max, d_max)
    gamma = ours.weight.detach().clone().requires_grad_(True)
    beta = ours.bias.detach().clone().requires_grad_(True)
    for step in range(6):
        training = step < 4
        ours.train(training)
        x = batch(layout, step).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        upstream = torch.randn(x.shape, dtype=torch.float64)
        y = ours(x)
        y_ref = (
            reference.train(x_ref, gamma, beta) if training else reference.eval(x_ref, gamma, beta)
        )
        assert_close(y, y_ref, f"step {step}: y")
        ours.zero_grad()
        gamma.grad = beta.grad = None
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        assert_close(x.grad, x_ref.grad, f"step {step}: dx")
        assert_close(ours.weight.grad, gamma.grad, f"step {step}: dgamma")
        assert_close(ours.bias.grad, beta.grad, f"step {step}: dbeta")
        assert_close(ours.running_mean, reference.mu.reshape(-1), f"step {step}: running_mean")
        assert_close(ours.running_var, reference.var.reshape(-1), f"step {step}: running_var")
    assert int(ours.num_batches_tracked) == int(ours.num_train_steps) == 4
    assert reference.unclipped > 0  # the corrections did something ...
    if clips == (1.5, 0.5):
        assert reference.clipped > 0  # ... and the clips did too


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("options", [{"r_max": 1.0, "d_max": 0.0}, {"warmup": 3}])
def test_batchrenorm_is_torch_batch_norm_without_corrections_and_in_warmup(layout, options):
    ours = build("batchrenorm", layout, **options)
    theirs = TORCH_BN[len(SHAPES[layout])](C).double()
    theirs.load_state_dict(ours.state_dict(), strict=False)  # same weight and bias
    for step in range(3):
        x = batch(layout, step).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        upstream = torch.randn(x.shape, dtype=torch.float64)
        y, y_ref = ours(x), channels_first(theirs(channels_first(x_ref, layout)), layout)
        assert_close(y, y_ref, f"step {step}: y")
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        assert_close(x.grad, x_ref.grad, f"step {step}: dx")
        assert_close(ours.weight.grad, theirs.weight.grad, f"step {step}: dgamma")
        assert_close(ours.bias.grad, theirs.bias.grad, f"step {step}: dbeta")
        assert_close(ours.running_mean, theirs.running_mean, "running_mean")
        assert_close(ours.running_var, theirs.running_var, "running_var")
        ours.zero_grad()
        theirs.zero_grad()
    ours.eval()
    theirs.eval()
    x = batch(layout, 7)
    assert_close(ours(x), channels_first(theirs(channels_first(x, layout)), layout), "eval")
    if "warmup" in options:  # the fourth step corrects: no longer batch norm
        ours.train()
        theirs.train()
        y = ours(batch(layout, 3))
        y_ref = channels_first(theirs(channels_first(batch(layout, 3), layout)), layout)
        assert not torch.allclose(y, y_ref)


@pytest.mark.parametrize("layout", ["fc", "conv", "seq"])
def test_batchrenorm_gradient_is_the_derivative_with_r_and_d_held_fixed(layout, monkeypatch):
    """Finite differences see r and d move with the batch, which the algorithm's gradient
    ignores by design; with them held at their values the two must agree (float64)."""
    ours = build("batchrenorm", layout)
    with torch.no_grad():
        for step in range(2):
            ours(batch(layout, step, size=4))
    x = batch(layout, 2, size=4).requires_grad_(True)
    with torch.no_grad():
        mean, var = (
            x.mean(get_layout(layout).reduce_dims),
            x.var(get_layout(layout).reduce_dims, unbiased=False),
        )
        r, d = ours._corrections(mean.reshape(1, -1), torch.rsqrt(var + ours.eps).reshape(1, -1))
    assert not torch.allclose(r, torch.ones_like(r)) and not torch.allclose(d, torch.zeros_like(d))
    monkeypatch.setattr(ours, "_corrections", lambda mean, invstd: (r, d))
    params = tuple(p.detach().clone().requires_grad_(True) for p in (ours.weight, ours.bias))

    def forward(x, weight, bias):
        return torch.func.functional_call(ours, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(forward, (x, *params))


def test_batchrenorm_counts_training_steps_apart_from_the_running_statistics():
    ours = build("batchrenorm", "fc", warmup=2)
    with torch.no_grad():  # no steps: not recorded by autograd
        ours(batch("fc", 0))
    assert int(ours.num_train_steps) == 0 and int(ours.num_batches_tracked) == 1
    for step in range(2):
        ours(batch("fc", step))
    with cumulative_running_stats([ours]), torch.no_grad():  # the harness's re-estimation
        ours(batch("fc", 5))
    assert int(ours.num_train_steps) == 2 and int(ours.num_batches_tracked) == 1
    plain = TORCH_BN[2](C).double()
    plain.load_state_dict(ours.state_dict(), strict=False)
    x = batch("fc", 6)
    assert not torch.allclose(ours(x), plain(x))  # past the warmup: corrected
    ours.reset_running_stats()
    assert int(ours.num_train_steps) == 3
    ours.reset_parameters()
    assert int(ours.num_train_steps) == 0


def test_batchrenorm_loads_batch_norm_state_dicts_with_the_step_count():
    trained = build("batchnorm", "conv")
    for step in range(3):
        trained(batch("conv", step))
    for state in (trained.state_dict(), nn.BatchNorm2d(C).double().state_dict()):
        renorm = build("batchrenorm", "conv")
        renorm.load_state_dict(state)
        assert int(renorm.num_train_steps) == int(state["num_batches_tracked"])
        assert torch.equal(renorm.running_var, state["running_var"])
    saved = renorm.state_dict()
    assert saved._metadata[""]["version"] == 3 and "num_train_steps" in saved


# -- ghostbn -------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("size", [4, 5, 32], ids=lambda size: f"virtual{size}")
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_ghostbn_is_torch_batch_norm_on_each_virtual_batch_in_turn(layout, size, momentum):
    """Batches of 22 (fc), 6 and 5 examples: virtual batches of 4 and 5 leave a smaller last
    one (and split 5 examples as 4 + 1 for conv3d, 5 for the others), 32 holds the whole batch."""
    ours = build("ghostbn", layout, virtual_batch_size=size, momentum=momentum)
    theirs = TORCH_BN[len(SHAPES[layout])](C, momentum=momentum).double()
    theirs.load_state_dict(ours.state_dict())
    for step in range(4):
        training = step < 3
        ours.train(training)
        theirs.train(training)
        x = batch(layout, step).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        upstream = torch.randn(x.shape, dtype=torch.float64)
        y = ours(x)
        if training:
            chunks = channels_first(x_ref, layout).split(size)
            y_ref = channels_first(torch.cat([theirs(chunk) for chunk in chunks]), layout)
        else:
            y_ref = channels_first(theirs(channels_first(x_ref, layout)), layout)
        assert_close(y, y_ref, f"step {step}: y")
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        assert_close(x.grad, x_ref.grad, f"step {step}: dx")
        assert_close(ours.weight.grad, theirs.weight.grad, f"step {step}: dgamma")
        assert_close(ours.bias.grad, theirs.bias.grad, f"step {step}: dbeta")
        for key, value in theirs.state_dict().items():
            assert_close(ours.state_dict()[key], value, f"step {step}: {key}", 1e-12)
        ours.zero_grad()
        theirs.zero_grad()
    chunks_per_step = -(-SHAPES[layout][0] // size)
    assert int(ours.num_batches_tracked) == 3 * chunks_per_step


def test_ghostbn_refuses_a_last_virtual_batch_of_one_value_per_channel():
    ours = build("ghostbn", "fc", virtual_batch_size=8)
    with pytest.raises(normzoo.BatchSizeError) as caught:
        ours(batch("fc", 0, size=17))
    assert str(caught.value) == (
        "ghostbn cuts the batch of 17 examples into virtual batches of 8; the last, of 1, has 1 "
        "value per channel and no variance; use a batch size that leaves at least 2 examples in "
        "it, or call .eval()"
    )
    build("ghostbn", "conv", virtual_batch_size=8)(batch("conv", 0, size=17))  # 12 values: fine


# -- frozenbn ------------------------------------------------------------------------------------


def as_nchw(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Any layout's input as the ``(N, C, H, W)`` that torchvision's layer takes."""
    x = channels_first(x, layout)
    return x.reshape(x.shape[0], C, -1, 1) if x.dim() != 4 else x


def from_nchw(y: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    return channels_first(y.reshape(channels_first(like, layout).shape), layout)


def frozen_pair(eps=1e-5):
    theirs = torchvision.ops.FrozenBatchNorm2d(C, eps=eps).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
        theirs.running_mean.normal_()
        theirs.running_var.uniform_(0.2, 3.0)
    return theirs


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_frozenbn_equals_torchvision_in_train_and_eval(layout):
    theirs = frozen_pair(eps=1e-3)
    ours = normzoo.build("frozenbn", C, layout, eps=1e-3).double()
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.parameters()) == []
    assert [name for name, _ in ours.named_buffers()] == [
        "weight", "bias", "running_mean", "running_var"
    ]  # fmt: skip
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    x = batch(layout, 1).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(x.shape, dtype=torch.float64)
    y_train = ours.train()(x)
    y_eval = ours.eval()(x)
    assert torch.equal(y_train, y_eval)
    y_ref = from_nchw(theirs(as_nchw(x_ref, layout)), layout, x_ref)
    assert_close(y_train, y_ref, "y", 1e-12)
    (y_train * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    assert_close(x.grad, x_ref.grad, "dx", 1e-12)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} moved"
    back = torchvision.ops.FrozenBatchNorm2d(C, eps=1e-3).double()
    back.load_state_dict(ours.state_dict())  # strict: the same names
    assert_close(from_nchw(back(as_nchw(x, layout)), layout, x), y_eval, "round trip", 1e-12)


def test_frozenbn_loads_a_batch_norm_state_dict_as_torchvision_does():
    trained = nn.BatchNorm2d(C).double()
    trained(batch("conv", 0))
    ours = normzoo.build("frozenbn", C, "conv").double()
    ours.load_state_dict(trained.state_dict())  # num_batches_tracked is dropped
    x = batch("conv", 1)
    assert_close(ours(x), trained.eval()(x), "eval", 1e-12)
    before = ours.running_mean.clone()
    ours.reset_parameters()  # a model-wide re-initialization leaves frozen data alone
    assert torch.equal(ours.running_mean, before)


def trained_resnet18() -> nn.Module:
    """torchvision's resnet18 after a few SGD steps in train mode: batch statistics and affine
    that training produced, not the initial ones."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(16, 3, 32, 32) * 2 + 0.5
    labels = torch.arange(16) % 10
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.double().eval()


def test_convert_freezes_a_trained_resnet18_with_its_statistics_and_affine():
    model = trained_resnet18()
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in batch_norms)
    assert any(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in batch_norms)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything carried over: no ConvertWarning
        normzoo.convert(model, "frozenbn")
    frozen = [m for m in model.modules() if type(m).__name__ == "FrozenBatchNorm"]
    assert len(frozen) == 20 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.weight.dtype == torch.float64 and not m.training for m in frozen)
    with torch.no_grad():
        assert_close(model(x), expected, "eval output after convert", 1e-10)
        assert_close(model.train()(x), expected, "train mode too: frozen", 1e-10)
    twin = torchvision.models.resnet18(num_classes=10, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    twin.double().load_state_dict(model.state_dict())  # torchvision's frozen resnet, strictly
    with torch.no_grad():
        assert_close(twin.eval()(x), expected, "torchvision's frozen resnet18", 1e-10)


def test_convert_to_frozenbn_reports_what_the_old_layer_lacks():
    identity_affine = normzoo.convert(nn.BatchNorm1d(C, affine=False), "frozenbn")
    assert torch.equal(identity_affine.weight, torch.ones(C))  # no affine: 1 and 0, nothing lost
    with pytest.warns(normzoo.ConvertWarning, match="running_mean of 1 layer.*running_var"):
        normzoo.convert(nn.Sequential(nn.BatchNorm2d(C, track_running_stats=False)), "frozenbn")
    with pytest.warns(normzoo.ConvertWarning, match="running_mean"):
        group = normzoo.convert(nn.Sequential(nn.GroupNorm(1, C)), "frozenbn")
    assert type(group[0]).__name__ == "FrozenBatchNorm"


# -- torch.distributed: two gloo processes against one -------------------------------------------

SPLITS = [[8, 8], [3, 13], [0, 16]]
DISTRIBUTED = {
    "batchrenorm": {},
    "batchrenorm-tight": {"r_max": 1.5, "d_max": 0.5},
    "ghostbn-4": {"virtual_batch_size": 4},  # every virtual batch within one share for 8 + 8
    "ghostbn-6": {"virtual_batch_size": 6},  # virtual batches straddling the shares
}


def norm_of(case: str) -> str:
    return case.split("-")[0]


def distributed_worker(rank: int, world: int, store: str, out: str) -> None:
    """What each of the two processes runs: every case on its share, two training steps."""
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for split in SPLITS:
        for case, options in DISTRIBUTED.items():
            for layout in worker.CHANNELS:
                results[(case, layout, tuple(split))] = worker.train_step(
                    norm_of(case), layout, split, rank, **options
                )
    results["unsynced"] = worker.train_step(
        "ghostbn", "conv", [3, 13], rank, sync=False, virtual_batch_size=2
    )
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    if rank == 0:  # eval mode must not communicate (rank 1 would never answer)
        for case in DISTRIBUTED:
            worker.build(norm_of(case), "conv").eval()(worker.global_batch("conv", 5)[0])
    dist.all_reduce = original
    results["eval_collectives"] = len(calls)
    dist.barrier()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dist")
    mp.spawn(distributed_worker, args=(2, str(directory / "store"), str(directory)), nprocs=2,
             join=True)  # fmt: skip
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("layout", list(worker.CHANNELS))
@pytest.mark.parametrize("case", list(DISTRIBUTED))
def test_two_processes_equal_one_on_the_same_batch(two_processes, case, layout, split):
    single = worker.train_step(norm_of(case), layout, [sum(split)], 0, **DISTRIBUTED[case])
    ranks = [two_processes[r][(case, layout, tuple(split))] for r in (0, 1)]
    for key, expected in single.items():
        if key.startswith(("y", "grad_x")):  # per example: the ranks' shares side by side
            got = torch.cat([ranks[0][key], ranks[1][key]])
        else:  # parameters' gradients (summed) and running statistics: equal on every rank
            got = ranks[0][key]
            torch.testing.assert_close(ranks[1][key], got, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=key)


def test_ghostbn_without_sync_cuts_each_share_on_its_own(two_processes):
    """With ``sync=False`` rank 0's 3 examples are cut into virtual batches of 2 + 1 of their
    own, as one process holding just those 3 would."""
    alone = worker.train_step("ghostbn", "conv", [3, 13], 0, sync=False, virtual_batch_size=2)
    unsynced = two_processes[0]["unsynced"]
    for key in ("y0", "grad_x0", "y1", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(unsynced[key], alone[key], rtol=1e-12, atol=1e-12)


def test_eval_mode_communicates_nothing(two_processes):
    assert two_processes[0]["eval_collectives"] == 0
