"""The conformance suite every norm must pass, and the check every workload must pass, usable
from a third party's own tests.

Each check takes a :class:`Subject` (a norm, the registry it is in, the options and channel
count to build it with) and raises ``AssertionError`` naming the norm, the layout and what went
wrong when the norm breaks the contract of :mod:`normzoo.interface`. Every check runs over every
layout the norm declares, with the shapes of :mod:`normzoo.layouts`. Run them all with
:func:`check_norm`, or one pytest case per check::

    import pytest
    from normzoo.testing import CONFORMANCE_CHECKS, run_check

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
    def test_my_norm_conforms(check):
        run_check(check, "my-norm")
        run_check(check, "my-norm", options={"groups": 4}, num_features=8)

The checks use small random inputs, so the whole suite takes about a second per norm on a CPU.
"""

from __future__ import annotations

import copy
import io
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call

from normzoo.errors import LayoutError, NormzooError
from normzoo.interface import NormInfo
from normzoo.layouts import LAYOUT_NAMES, Layout, get_layout
from normzoo.registry import Registry, available, default_registry, workload
from normzoo.workloads.data import load_workload_data
from normzoo.workloads.slots import (
    ModelSettings,
    build_model,
    check_model_settings,
    norm_modules,
)

#: Channels of the test inputs unless the caller gives ``num_features``.
NUM_FEATURES = 4
#: Channels of the (smaller) gradcheck inputs unless the caller gives ``num_features``;
#: gradcheck costs two forwards per input element.
GRADCHECK_FEATURES = 2
#: Seconds one conformance check may take before it fails (``timeout=`` of :func:`run_check`
#: and :func:`check_norm` overrides it): generous, since the slowest check of a bundled norm
#: (pit's gradcheck with 5 channels) takes about 10 s on two busy CPU cores, yet a norm whose
#: forward blocks fails instead of hanging the suite.
CHECK_TIMEOUT = 120.0
#: The name prefix of the threads :func:`run_with_timeout` runs a call in, and abandons when it
#: overruns (the ``normzoo`` script ends the process past them: see ``normzoo_command``).
ABANDONED_THREAD_PREFIX = "normzoo: "

T = TypeVar("T")


@dataclass(frozen=True)
class Subject:
    """A norm under test: what to build and how.

    Parameters
    ----------
    norm:
        The declaration, from ``registry.info(name)``.
    registry:
        Where the norm is registered.
    options:
        Options for every build (defaults for the rest).
    num_features:
        Channel count of the test inputs; ``None`` for :data:`NUM_FEATURES`, and for
        :data:`GRADCHECK_FEATURES` in gradcheck.
    """

    norm: NormInfo
    registry: Registry
    options: Mapping[str, Any] = field(default_factory=dict)
    num_features: int | None = None

    @property
    def channels(self) -> int:
        return self.num_features or NUM_FEATURES

    @property
    def layouts(self) -> list[Layout]:
        return [get_layout(name) for name in self.norm.layouts]

    def build(self, layout: Layout, num_features: int | None = None) -> nn.Module:
        return self.registry.build(
            self.norm.name, num_features or self.channels, layout.name, **self.options
        )

    def where(self, layout: Layout) -> str:
        return f"norm {self.norm.name!r}, layout {layout.name!r}"


Check = Callable[[Subject], None]


def sample_input(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layout: str | Layout = "conv",
) -> torch.Tensor:
    """A reproducible input whose channels have different means and scales."""
    layout = get_layout(layout) if len(shape) != 2 else get_layout("fc")
    axis = layout.channel_axis if len(shape) == layout.ndim else 1
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    channels = torch.arange(shape[axis], dtype=torch.float64)
    view = tuple(shape[axis] if d == axis else 1 for d in range(len(shape)))
    return (x * (1.0 + channels).reshape(view) + (channels - 1.5).reshape(view)).to(dtype)


def input_shape(layout: Layout, num_features: int) -> tuple[int, ...]:
    """Shape of the suite's inputs: enough values per channel for stable batch statistics."""
    return layout.test_shape(num_features, batch=16 if layout.ndim == 2 else 4)


def gradcheck_shape(layout: Layout, num_features: int) -> tuple[int, ...]:
    """A smaller shape for gradcheck: 6 examples for ``fc``, else 2 with sizes of 2."""
    batch = 6 if layout.ndim == 2 else 2
    return tuple(batch if d == "N" else num_features if d == "C" else 2 for d in layout.dims)


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


def run_with_timeout(
    function: Callable[[], T],
    timeout: float | None,
    what: str,
    *,
    error: Callable[[str], BaseException] = TimeoutError,
) -> T:
    """``function()``'s result, or its exception, unless it runs longer than ``timeout`` seconds:
    then ``error("WHAT did not finish within TIMEOUT s")`` is raised.

    Works on any thread without signals: ``function`` runs in a daemon thread, joined with the
    timeout, under the caller's grad mode (which torch keeps per thread). A function that
    overruns cannot be stopped; its thread is abandoned, and as a daemon it does not keep the
    process alive. ``timeout=None`` calls ``function`` directly, on this thread.
    """
    if timeout is None:
        return function()
    outcome: dict[str, Any] = {}
    grad_enabled = torch.is_grad_enabled()

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):
                outcome["value"] = function()
        except BaseException as caught:  # re-raised on the caller's thread
            outcome["error"] = caught

    thread = threading.Thread(target=target, name=ABANDONED_THREAD_PREFIX + what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise error(f"{what} did not finish within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_check(
    check: str,
    norm_name: str,
    registry: Registry | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    num_features: int | None = None,
    timeout: float | None = CHECK_TIMEOUT,
) -> None:
    """Run conformance check ``check`` on norm ``norm_name`` over every layout it declares.

    Parameters
    ----------
    check:
        A name from :data:`CONFORMANCE_CHECKS`.
    norm_name:
        The norm, looked up in ``registry`` (the default registry when ``None``).
    options:
        Options for every build, e.g. ``{"groups": 4}``; the norm's defaults otherwise.
    num_features:
        Channel count of the test inputs, for options that constrain it; ``None`` for the
        suite's own (4, and 2 in gradcheck).
    timeout:
        Seconds the check may take (:data:`CHECK_TIMEOUT` by default); past them it fails with
        an ``AssertionError`` naming the norm and the check. ``None``: no limit.
    """
    registry = registry or default_registry()
    subject = Subject(registry.info(norm_name), registry, dict(options or {}), num_features)
    run_with_timeout(
        lambda: CHECKS[check](subject),
        timeout,
        f"norm {norm_name!r}: check {check!r}",
        error=lambda message: AssertionError(
            f"{message}; does its forward block? Pass timeout= (None for no limit) to allow more"
        ),
    )


def check_norm(
    norm_name: str,
    registry: Registry | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    num_features: int | None = None,
    timeout: float | None = CHECK_TIMEOUT,
) -> None:
    """Run every conformance check on ``norm_name``; the first failure raises. ``timeout``
    limits each check, as in :func:`run_check`."""
    for check in CONFORMANCE_CHECKS:
        run_check(
            check, norm_name, registry, options=options, num_features=num_features, timeout=timeout
        )


def fitting_norms(workload_name: str) -> list[str]:
    """The registered norms that fit workload ``workload_name`` with their default options:
    they declare every slot layout, and every slot's channel count accepts their options
    (``groupnorm``'s 2 groups do not fit a slot of 7 channels)."""
    fitting = []
    for norm in available():
        try:
            check_model_settings(ModelSettings(workload=workload_name, norm=norm.name))
        except NormzooError:
            continue
        fitting.append(norm.name)
    return fitting


def check_workload(
    workload_name: str, norms: Sequence[str] | None = None, batch_size: int = 16
) -> None:
    """Check workload ``workload_name`` with every norm that fits it (or ``norms``): the model
    builds with the norm in every slot, a training step on ``batch_size`` examples of the
    workload's own data gives finite logits of one row per example and a finite loss and
    changes the parameters, and an eval forward gives finite logits too.

    Raises ``AssertionError`` naming the workload and the norm. A third party's workload test
    is one line: ``check_workload("my-model")``.
    """
    declared = workload(workload_name)
    data = load_workload_data(workload_name, None, False)
    images, labels = data.train.images[:batch_size], data.train.labels[:batch_size]
    assert len(labels) == batch_size, (
        f"workload {workload_name!r}: fewer than {batch_size} examples"
    )
    for norm in fitting_norms(workload_name) if norms is None else norms:
        where = f"workload {workload_name!r} with norm {norm!r}"
        torch.manual_seed(0)
        model = build_model(ModelSettings(workload=workload_name, norm=norm))
        placed = norm_modules(model)
        assert len(placed) == len(declared.slots), f"{where}: {len(placed)} norms in the model"
        before = [parameter.detach().clone() for parameter in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        logits = model(images)
        assert logits.ndim == 2 and logits.shape[0] == batch_size, f"{where}: {logits.shape}"
        assert logits.shape[1] > int(labels.max()), f"{where}: {logits.shape[1]} classes"
        loss = nn.functional.cross_entropy(logits, labels)
        assert torch.isfinite(loss), f"{where}: training loss {loss.item()}"
        loss.backward()
        optimizer.step()
        after = list(model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), where
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(images)).all(), f"{where}: non-finite eval logits"
