"""The conformance checks, one function per rule of the contract of :mod:`normzoo.interface`,
and :data:`CHECKS`, the suite in the order it runs.

Each check takes a :class:`~normzoo.testing.subject.Subject`, runs over every layout the norm
declares, and raises ``AssertionError`` naming the norm, the layout and what went wrong, so
that a failure in a third party's tests says what to fix.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from normzoo.errors import LayoutError
from normzoo.layouts import LAYOUT_NAMES, Layout, get_layout
from normzoo.testing.inputs import gradcheck_shape, input_shape, sample_input
from normzoo.testing.subject import GRADCHECK_FEATURES, Check, Subject


def _input(layout: Layout, num_features: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return sample_input(input_shape(layout, num_features), dtype, seed, layout)


def _train_once(subject: Subject, module: nn.Module, layout: Layout, steps: int = 3) -> None:
    module.train()
    with torch.no_grad():
        for seed in range(steps):
            module(_input(layout, subject.channels, _dtype_of(module), seed=100 + seed))


def _dtype_of(module: nn.Module) -> torch.dtype:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _eval_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(x)


def check_shape_and_dtype(subject: Subject) -> None:
    """The output has the input's shape and dtype, in train and eval, in float32 and float64."""
    for layout in subject.layouts:
        for dtype in (torch.float32, torch.float64):
            module = subject.build(layout).to(dtype)
            x = _input(layout, subject.channels, dtype)
            for training in (True, False):
                module.train(training)
                with torch.no_grad():
                    y = module(x)
                mode = "train" if training else "eval"
                where = f"{subject.where(layout)}, {dtype}, {mode}"
                assert isinstance(y, torch.Tensor), f"{where}: output is a {type(y).__name__}"
                assert y.shape == x.shape, f"{where}: output shape {tuple(y.shape)} != input"
                assert y.dtype == dtype, f"{where}: output dtype {y.dtype} != {dtype}"
                assert torch.isfinite(y).all(), f"{where}: output is not finite"


def check_leaves_input_unchanged(subject: Subject) -> None:
    """The forward leaves its input tensor as it was, in train and in eval mode: a norm that
    normalizes in place corrupts the caller's tensor (a residual branch, the next check's
    input)."""
    for layout in subject.layouts:
        module = subject.build(layout)
        for training in (True, False):
            if not training:
                _train_once(subject, module, layout)
            module.train(training)
            x = _input(layout, subject.channels, seed=11)
            original = x.clone()
            with torch.no_grad():
                module(x)
            mode = "train" if training else "eval"
            assert torch.equal(x, original), (
                f"{subject.where(layout)}, {mode}: forward changed its input in place; compute "
                "into a new tensor (x - mean, not x.sub_(mean))"
            )


def check_train_eval(subject: Subject) -> None:
    """Eval is per example and leaves the state alone; train mixes the batch iff it should.

    In ``eval()`` mode an example's output must not depend on the rest of the batch and the
    state_dict must not change. In ``train()`` mode a norm declared ``uses_batch_stats`` must
    depend on the batch and update its buffers; any other norm must not depend on the batch.
    """
    for layout in subject.layouts:
        where = subject.where(layout)
        module = subject.build(layout)
        x = _input(layout, subject.channels)
        x_other = x.clone()
        x_other[1:] = _input(layout, subject.channels, seed=1)[1:]
        _train_once(subject, module, layout)
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
        if subject.norm.uses_batch_stats:
            assert depends, f"{where}: uses_batch_stats=True, yet train output ignores the batch"
            buffers = {key for key, value in module.named_buffers() if value.is_floating_point()}
            buffers &= set(before)  # persistent ones: those a state dict carries
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


def _perturb_parameters(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # parameters away from their defaults, so defaults cannot pass
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(0.1 * noise)


def check_state_dict_round_trip(subject: Subject) -> None:
    """A trained module saved with ``torch.save`` and loaded into a fresh one behaves the same."""
    for layout in subject.layouts:
        trained = subject.build(layout)
        _train_once(subject, trained, layout)
        _perturb_parameters(trained)
        buffer = io.BytesIO()
        torch.save(trained.state_dict(), buffer)
        buffer.seek(0)
        fresh = subject.build(layout)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        x = _input(layout, subject.channels, seed=7)
        assert torch.equal(_eval_output(trained, x), _eval_output(fresh, x)), (
            f"{subject.where(layout)}: eval output differs after a state_dict round trip; is "
            "some state kept outside parameters and buffers?"
        )


def check_deepcopy(subject: Subject) -> None:
    """``copy.deepcopy`` of a trained module (as EMA models, probes and DDP's replicas make)
    gives the same eval output, and training the copy leaves the original alone."""
    for layout in subject.layouts:
        original = subject.build(layout)
        _train_once(subject, original, layout)
        x = _input(layout, subject.channels, seed=7)
        before = _eval_output(original, x)
        clone = copy.deepcopy(original)
        assert torch.equal(_eval_output(clone, x), before), (
            f"{subject.where(layout)}: a deepcopy gives another eval output"
        )
        _train_once(subject, clone, layout)
        assert torch.equal(_eval_output(original, x), before), (
            f"{subject.where(layout)}: training a deepcopy changed the original"
        )


def check_instances_are_independent(subject: Subject) -> None:
    """Training one instance changes nothing in another: no state shared through a
    module-level tensor or any other object outside the module."""
    for layout in subject.layouts:
        bystander = subject.build(layout)
        x = _input(layout, subject.channels, seed=7)
        state, output = _state(bystander), _eval_output(bystander, x)
        trained = subject.build(layout)
        _train_once(subject, trained, layout, steps=4)
        with torch.no_grad():
            trained.train()(_input(layout, subject.channels, seed=9) * 3 + 5)
        for key, value in bystander.state_dict().items():
            assert torch.equal(value, state[key]), (
                f"{subject.where(layout)}: training another instance changed {key!r} of this "
                "one; is state shared through a module-level tensor?"
            )
        assert torch.equal(_eval_output(bystander, x), output), (
            f"{subject.where(layout)}: training another instance changed this one's output"
        )


def check_eval_uses_parameters(subject: Subject) -> None:
    """Every learned parameter affects the output in train and in eval mode (a norm whose eval
    branch forgets ``weight`` or ``bias`` fails)."""
    for layout in subject.layouts:
        module = subject.build(layout)
        _train_once(subject, module, layout)
        x = _input(layout, subject.channels, seed=7)
        for name, parameter in list(module.named_parameters()):
            for training in (True, False):
                module.train(training)
                state = _state(module)
                with torch.no_grad():
                    before = module(x)
                    module.load_state_dict(state)  # train-mode forwards move running stats
                    # uneven, so that a parameter read through a softmax (mixture weights that
                    # start equal) or a ratio still changes what it computes
                    ramp = torch.linspace(0, 1, parameter.numel(), dtype=parameter.dtype)
                    parameter.add_(0.5 + parameter.abs() + ramp.reshape(parameter.shape))
                    after = module(x)
                    module.load_state_dict(state)
                mode = "train" if training else "eval"
                assert not torch.allclose(before, after), (
                    f"{subject.where(layout)}: changing parameter {name!r} does not change the "
                    f"{mode}-mode output"
                )


def _other_layouts(subject: Subject, layout: Layout, x: torch.Tensor) -> list[torch.Tensor]:
    """Inputs that do not fit ``layout``: one dimension more, one fewer, other channels."""
    wrong = [x.unsqueeze(-1), x.narrow(x.dim() - 1, 0, 1).squeeze(-1)]
    shape = list(x.shape)
    shape[layout.channel_axis] += 1
    wrong.append(torch.randn(shape))
    return [w for w in wrong if w.dim() >= 1]


def check_rejects_wrong_shapes(subject: Subject) -> None:
    """An input that does not fit the layout (other rank, other channel count) is rejected with
    a one-line ``ValueError`` (``normzoo.LayoutError`` is one), in train and eval; a layout the
    norm does not declare is rejected at build time."""
    for layout in subject.layouts:
        module = subject.build(layout)
        x = _input(layout, subject.channels)
        for wrong in _other_layouts(subject, layout, x):
            for training in (True, False):
                module.train(training)
                where = f"{subject.where(layout)}, input {tuple(wrong.shape)}"
                try:
                    with torch.no_grad():
                        module(wrong)
                except ValueError as error:
                    message = str(error)
                    assert message and "\n" not in message.strip(), (
                        f"{where}: the error is not one line: {message!r}"
                    )
                except Exception as error:
                    raise AssertionError(
                        f"{where}: rejected with {type(error).__name__} instead of a ValueError "
                        f"naming the layout: {error}"
                    ) from error
                else:
                    raise AssertionError(f"{where}: an input of the wrong shape was accepted")
    for name in LAYOUT_NAMES:
        if name not in subject.norm.layouts:
            try:
                subject.build(get_layout(name))
            except LayoutError:
                continue
            raise AssertionError(f"norm {subject.norm.name!r}: undeclared layout {name!r} built")


def _noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous tensor (every other element of a larger
    one, with the dimensions stored in reverse order)."""
    wide = torch.zeros(tuple(reversed(x.shape)) + (2,), dtype=x.dtype)
    reordered = wide.permute(*reversed(range(x.dim())), x.dim())[..., 0]
    reordered.copy_(x)
    assert not reordered.is_contiguous()
    return reordered


def _memory_layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    variants = {"non-contiguous": _noncontiguous(x)}
    if x.dim() == 4:
        variants["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        variants["channels_last_3d"] = x.contiguous(memory_format=torch.channels_last_3d)
    return variants


def check_memory_format(subject: Subject) -> None:
    """Channels-last and non-contiguous inputs give the output and running statistics of the
    same values in a contiguous tensor, in train and eval."""
    for layout in subject.layouts:
        x = _input(layout, subject.channels, seed=5)
        for label, variant in _memory_layouts(x).items():
            reference, candidate = subject.build(layout), subject.build(layout)
            where = f"{subject.where(layout)}, {label} input"
            for training in (True, False):
                reference.train(training)
                candidate.train(training)
                with torch.no_grad():
                    expected, actual = reference(x), candidate(variant)
                mode = "train" if training else "eval"
                torch.testing.assert_close(
                    actual.contiguous(), expected, rtol=1e-5, atol=1e-5,
                    msg=lambda m, where=where, mode=mode: f"{where}, {mode}: {m}",
                )  # fmt: skip
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(
                    candidate.state_dict()[key], value, rtol=1e-5, atol=1e-6,
                    msg=lambda m, where=where, key=key: f"{where}: {key}: {m}",
                )  # fmt: skip


def _plain_tensor_attributes(module: nn.Module) -> list[str]:
    return [
        f"{prefix or type(module).__name__}.{key}"
        for prefix, sub in module.named_modules()
        for key, value in vars(sub).items()
        if isinstance(value, torch.Tensor)
    ]


def check_to_moves_state(subject: Subject) -> None:
    """``.to()`` converts every tensor of the module: no state hides in plain attributes.

    Plain tensor attributes escape ``.to()``, ``state_dict`` and DDP; state must live in
    parameters or (possibly non-persistent) buffers. Moves to CUDA too when a GPU is present.
    """
    targets: list[torch.device | torch.dtype] = [torch.float64]
    if torch.cuda.is_available():
        targets.append(torch.device("cuda"))
    for layout in subject.layouts:
        for target in targets:
            module = subject.build(layout)
            _train_once(subject, module, layout)
            _eval_output(module, _input(layout, subject.channels))  # fill any eval-time cache
            module.to(target)
            where = f"{subject.where(layout)}, .to({target})"
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
            x = _input(layout, subject.channels, dtype).to(device)
            for training in (False, True):
                module.train(training)
                with torch.no_grad():
                    y = module(x)
                assert y.device.type == device.type and y.dtype == dtype, where


def check_gradcheck(subject: Subject) -> None:
    """Analytic gradients w.r.t. input and parameters match finite differences in float64, in
    train and eval mode (eval only for a norm that declares ``exact_train_gradient=False``)."""
    channels = subject.num_features or GRADCHECK_FEATURES
    for layout in subject.layouts:
        shape = gradcheck_shape(layout, channels)
        module = subject.build(layout, num_features=channels).double()
        module.train()
        with torch.no_grad():
            for seed in range(3):
                module(sample_input(shape, torch.float64, 100 + seed, layout))
        names = [name for name, _ in module.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
        x = sample_input(shape, torch.float64, 0, layout).requires_grad_(True)

        def forward(
            x: torch.Tensor, *values: torch.Tensor, module: nn.Module = module, names=names
        ) -> torch.Tensor:
            return functional_call(module, dict(zip(names, values, strict=True)), (x,))

        for training in (True, False) if subject.norm.exact_train_gradient else (False,):
            module.train(training)
            mode = "train" if training else "eval"
            with _frozen_buffers(module):
                ok = torch.autograd.gradcheck(forward, (x, *params), raise_exception=False)
            assert ok, f"{subject.where(layout)}: float64 gradcheck failed in {mode} mode"


@contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Restore the buffers after gradcheck, whose many forwards update running statistics."""
    saved = _state(module)
    try:
        yield
    finally:
        module.load_state_dict(saved)


def check_deterministic(subject: Subject) -> None:
    """Same seed, same module and same output; the same eval input twice, the same output."""
    for layout in subject.layouts:
        outputs = []
        for _ in range(2):
            torch.manual_seed(1234)
            module = subject.build(layout)
            _train_once(subject, module, layout)
            with torch.no_grad():
                outputs.append(module(_input(layout, subject.channels, seed=3)))
            first = _eval_output(module, _input(layout, subject.channels, seed=4))
            second = _eval_output(module, _input(layout, subject.channels, seed=4))
            assert torch.equal(first, second), f"{subject.where(layout)}: eval is not repeatable"
        assert torch.equal(outputs[0], outputs[1]), (
            f"{subject.where(layout)}: same seed, other output"
        )


def check_batch_of_one(subject: Subject) -> None:
    """A norm with batch statistics rejects, in train mode, a batch of one value per channel.

    The error must be a ``ValueError`` (``normzoo.BatchSizeError`` is one) whose message says
    what is wrong, not a NaN output or a crash deep inside torch.
    """
    if not subject.norm.uses_batch_stats:
        return
    for layout in subject.layouts:
        module = subject.build(layout).train()
        x = torch.randn(layout.single_value_shape(subject.channels))
        try:
            module(x)
        except ValueError as error:
            assert str(error), f"{subject.where(layout)}: ValueError without a message"
        else:
            raise AssertionError(f"{subject.where(layout)}: a batch of one was accepted in train")


CHECKS: dict[str, Check] = {
    "shape_and_dtype": check_shape_and_dtype,
    "leaves_input_unchanged": check_leaves_input_unchanged,  # before the checks it would mislead
    "train_eval": check_train_eval,
    "state_dict_round_trip": check_state_dict_round_trip,
    "deepcopy": check_deepcopy,
    "instances_are_independent": check_instances_are_independent,
    "eval_uses_parameters": check_eval_uses_parameters,
    "rejects_wrong_shapes": check_rejects_wrong_shapes,
    "memory_format": check_memory_format,
    "to_moves_state": check_to_moves_state,
    "gradcheck": check_gradcheck,
    "deterministic": check_deterministic,
    "batch_of_one": check_batch_of_one,
}
#: Names of the conformance checks, for ``pytest.mark.parametrize``.
CONFORMANCE_CHECKS: list[str] = list(CHECKS)
