"""The conformance suite every norm must pass, usable from a third party's own tests.

Each check takes a norm name and raises ``AssertionError`` (naming the norm, layout and what
went wrong) when the norm breaks the contract of :mod:`normzoo.interface`. Run them all with
:func:`check_norm`, or one pytest case per check::

    import pytest
    from normzoo.testing import CONFORMANCE_CHECKS, run_check

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
    def test_my_norm_conforms(check):
        run_check(check, "my-norm")

The checks build each norm with its default options, for every layout it declares, on small
random inputs, so the whole suite takes well under a second per norm on a CPU.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from normzoo.interface import NormInfo
from normzoo.registry import Registry

NUM_FEATURES = 4
#: Input shapes per layout: enough values per channel for stable batch statistics.
SHAPES = {"fc": (16, NUM_FEATURES), "conv": (4, NUM_FEATURES, 3, 3)}
#: Smaller shapes for gradcheck, which costs one forward per input element.
GRADCHECK_SHAPES = {"fc": (6, 3), "conv": (2, 3, 2, 2)}

Check = Callable[[NormInfo, Registry], None]


def _default_registry() -> Registry:
    from normzoo import default_registry

    return default_registry()


def sample_input(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """A reproducible input whose channels have different means and scales."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    channels = torch.arange(shape[1], dtype=torch.float64)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    return (x * (1.0 + channels).reshape(view) + (channels - 1.5).reshape(view)).to(dtype)


def _build(norm: NormInfo, registry: Registry, layout: str, num_features: int = NUM_FEATURES):
    return registry.build(norm.name, num_features, layout)


def _where(norm: NormInfo, layout: str) -> str:
    return f"norm {norm.name!r}, layout {layout!r}"


def _train_once(module: nn.Module, layout: str, steps: int = 3) -> None:
    module.train()
    with torch.no_grad():
        for seed in range(steps):
            module(sample_input(SHAPES[layout], _dtype_of(module), seed=100 + seed))


def _dtype_of(module: nn.Module) -> torch.dtype:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def check_shape_and_dtype(norm: NormInfo, registry: Registry) -> None:
    """The output has the input's shape and dtype, in train and eval, in float32 and float64."""
    for layout in norm.layouts:
        for dtype in (torch.float32, torch.float64):
            module = _build(norm, registry, layout).to(dtype)
            x = sample_input(SHAPES[layout], dtype)
            for training in (True, False):
                module.train(training)
                with torch.no_grad():
                    y = module(x)
                mode = "train" if training else "eval"
                where = f"{_where(norm, layout)}, {dtype}, {mode}"
                assert y.shape == x.shape, f"{where}: output shape {tuple(y.shape)} != input"
                assert y.dtype == dtype, f"{where}: output dtype {y.dtype} != {dtype}"
                assert torch.isfinite(y).all(), f"{where}: output is not finite"


def check_train_eval(norm: NormInfo, registry: Registry) -> None:
    """Eval is per example and leaves the state alone; train mixes the batch iff it should.

    In ``eval()`` mode an example's output must not depend on the rest of the batch and the
    state_dict must not change. In ``train()`` mode a norm declared ``uses_batch_stats`` must
    depend on the batch and update its buffers; any other norm must not depend on the batch.
    """
    for layout in norm.layouts:
        where = _where(norm, layout)
        module = _build(norm, registry, layout)
        x = sample_input(SHAPES[layout])
        x_other = x.clone()
        x_other[1:] = sample_input(SHAPES[layout], seed=1)[1:]
        _train_once(module, layout)
        module.eval()
        before = _state(module)
        with torch.no_grad():
            first, second = module(x)[0], module(x_other)[0]
        assert torch.equal(first, second), f"{where}: eval output depends on the other examples"
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), f"{where}: eval forward changed {key!r}"

        module.train()
        with torch.no_grad():
            first, second = module(x)[0], module(x_other)[0]
        depends = not torch.allclose(first, second, rtol=1e-5, atol=1e-6)
        if norm.uses_batch_stats:
            assert depends, f"{where}: uses_batch_stats=True, yet train output ignores the batch"
            buffers = {key for key, value in before.items() if value.is_floating_point()}
            changed = [
                key for key in buffers if not torch.equal(module.state_dict()[key], before[key])
            ]
            assert not buffers or changed, (
                f"{where}: train forward updated none of {sorted(buffers)}"
            )
        else:
            assert not depends, (
                f"{where}: uses_batch_stats=False, yet train output depends on the batch"
            )


def check_state_dict_round_trip(norm: NormInfo, registry: Registry) -> None:
    """A trained module saved with ``torch.save`` and loaded into a fresh one behaves the same."""
    for layout in norm.layouts:
        trained = _build(norm, registry, layout)
        _train_once(trained, layout)
        with torch.no_grad():  # perturb parameters so that defaults cannot pass by accident
            for parameter in trained.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        buffer = io.BytesIO()
        torch.save(trained.state_dict(), buffer)
        buffer.seek(0)
        fresh = _build(norm, registry, layout)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        trained.eval()
        fresh.eval()
        x = sample_input(SHAPES[layout], seed=7)
        with torch.no_grad():
            expected, actual = trained(x), fresh(x)
        assert torch.equal(expected, actual), (
            f"{_where(norm, layout)}: eval output differs after a state_dict round trip; is some "
            "state kept outside parameters and buffers?"
        )


def _plain_tensor_attributes(module: nn.Module) -> list[str]:
    return [
        f"{prefix or type(module).__name__}.{key}"
        for prefix, sub in module.named_modules()
        for key, value in vars(sub).items()
        if isinstance(value, torch.Tensor)
    ]


def check_to_moves_state(norm: NormInfo, registry: Registry) -> None:
    """``.to()`` converts every tensor of the module: no state hides in plain attributes.

    Plain tensor attributes escape ``.to()``, ``state_dict`` and DDP; state must live in
    parameters or (possibly non-persistent) buffers. Moves to CUDA too when a GPU is present.
    """
    targets: list[torch.device | torch.dtype] = [torch.float64]
    if torch.cuda.is_available():
        targets.append(torch.device("cuda"))
    for layout in norm.layouts:
        for target in targets:
            module = _build(norm, registry, layout)
            _train_once(module, layout)
            module.eval()
            with torch.no_grad():
                module(sample_input(SHAPES[layout]))  # fill any eval-time cache first
            module.to(target)
            where = f"{_where(norm, layout)}, .to({target})"
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                if isinstance(target, torch.dtype) and tensor.is_floating_point():
                    assert tensor.dtype == target, f"{where}: {name} stayed {tensor.dtype}"
                if isinstance(target, torch.device):
                    assert tensor.device.type == target.type, (
                        f"{where}: {name} stayed on {tensor.device}"
                    )
            plain = _plain_tensor_attributes(module)
            assert not plain, f"{where}: tensors kept as plain attributes: {plain}"
            dtype = target if isinstance(target, torch.dtype) else torch.float32
            device = target if isinstance(target, torch.device) else torch.device("cpu")
            x = sample_input(SHAPES[layout], dtype).to(device)
            for training in (False, True):
                module.train(training)
                with torch.no_grad():
                    y = module(x)
                assert y.device.type == device.type and y.dtype == dtype, where


def check_gradcheck(norm: NormInfo, registry: Registry) -> None:
    """Analytic gradients w.r.t. input and parameters match finite differences in float64."""
    for layout in norm.layouts:
        shape = GRADCHECK_SHAPES[layout]
        module = _build(norm, registry, layout, num_features=shape[1]).double()
        module.train()
        with torch.no_grad():
            for seed in range(3):
                module(sample_input(shape, torch.float64, seed=100 + seed))
        names = [name for name, _ in module.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
        x = sample_input(shape, torch.float64).requires_grad_(True)

        def forward(
            x: torch.Tensor, *values: torch.Tensor, module: nn.Module = module, names=names
        ) -> torch.Tensor:
            return functional_call(module, dict(zip(names, values, strict=True)), (x,))

        for training in (True, False):
            module.train(training)
            mode = "train" if training else "eval"
            with _frozen_buffers(module):
                ok = torch.autograd.gradcheck(forward, (x, *params), raise_exception=False)
            assert ok, f"{_where(norm, layout)}: float64 gradcheck failed in {mode} mode"


@contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Restore the buffers after gradcheck, whose many forwards update running statistics."""
    saved = _state(module)
    try:
        yield
    finally:
        module.load_state_dict(saved)


def check_deterministic(norm: NormInfo, registry: Registry) -> None:
    """Same seed, same module and same output; the same eval input twice, the same output."""
    for layout in norm.layouts:
        outputs = []
        for _ in range(2):
            torch.manual_seed(1234)
            module = _build(norm, registry, layout)
            _train_once(module, layout)
            with torch.no_grad():
                outputs.append(module(sample_input(SHAPES[layout], seed=3)))
            module.eval()
            with torch.no_grad():
                first = module(sample_input(SHAPES[layout], seed=4))
                second = module(sample_input(SHAPES[layout], seed=4))
            assert torch.equal(first, second), f"{_where(norm, layout)}: eval is not repeatable"
        assert torch.equal(outputs[0], outputs[1]), (
            f"{_where(norm, layout)}: same seed, other output"
        )


def check_batch_of_one(norm: NormInfo, registry: Registry) -> None:
    """A norm with batch statistics rejects, in train mode, a batch of one value per channel.

    The error must be a ``ValueError`` (``normzoo.BatchSizeError`` is one) whose message says
    what is wrong, not a NaN output or a crash deep inside torch.
    """
    if not norm.uses_batch_stats:
        return
    for layout in norm.layouts:
        module = _build(norm, registry, layout).train()
        x = torch.randn((1, NUM_FEATURES) + ((1, 1) if layout == "conv" else ()))
        try:
            module(x)
        except ValueError as error:
            assert str(error), f"{_where(norm, layout)}: ValueError without a message"
        else:
            raise AssertionError(
                f"{_where(norm, layout)}: a batch of one was accepted in train mode"
            )


CHECKS: dict[str, Check] = {
    "shape_and_dtype": check_shape_and_dtype,
    "train_eval": check_train_eval,
    "state_dict_round_trip": check_state_dict_round_trip,
    "to_moves_state": check_to_moves_state,
    "gradcheck": check_gradcheck,
    "deterministic": check_deterministic,
    "batch_of_one": check_batch_of_one,
}
#: Names of the conformance checks, for ``pytest.mark.parametrize``.
CONFORMANCE_CHECKS: list[str] = list(CHECKS)


def run_check(check: str, norm_name: str, registry: Registry | None = None) -> None:
    """Run conformance check ``check`` on norm ``norm_name`` (default registry if none given)."""
    registry = registry or _default_registry()
    CHECKS[check](registry.info(norm_name), registry)


def check_norm(norm_name: str, registry: Registry | None = None) -> None:
    """Run every conformance check on ``norm_name``; the first failure raises."""
    for check in CONFORMANCE_CHECKS:
        run_check(check, norm_name, registry)
