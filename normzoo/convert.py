"""Swap a registered norm into any model: :func:`convert`.

torch's ``SyncBatchNorm.convert_sync_batchnorm`` converts batch norms to one other kind; this
replaces every normalization layer it recognises (or that ``match`` selects) by any registered
norm, with the right layout and number of features, and carries over what means the same
thing in both: the affine parameters, the running statistics that share a name and shape,
``eps``, ``momentum`` and ``affine`` (and a group norm's groups) unless given.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

from normzoo import registry
from normzoo.errors import NormzooError
from normzoo.layouts import LAYOUT_NAMES

log = logging.getLogger(__name__)

#: The layout of each torch norm class when it cannot be read from the module itself.
#: ``BatchNorm1d`` takes ``(N, C)`` or ``(N, C, L)``; it is taken as ``fc``, the common case;
#: ``GroupNorm`` as ``conv``; ``LayerNorm(C)`` (over the last dimension) as ``seq``, tokens
#: ``(N, L, C)``, and a ``LayerNorm`` over more dimensions as ``conv`` with the first as ``C``.
#: A layer used otherwise (a ``LayerNorm(C)`` on ``(N, C)``) is left out with ``match``.
TORCH_LAYOUTS: dict[type[nn.Module], str] = {
    nn.BatchNorm1d: "fc",
    nn.BatchNorm2d: "conv",
    nn.BatchNorm3d: "conv3d",
    nn.SyncBatchNorm: "conv",
    nn.InstanceNorm1d: "conv1d",
    nn.InstanceNorm2d: "conv",
    nn.InstanceNorm3d: "conv3d",
    nn.GroupNorm: "conv",
}
_TORCH_FORWARDS = {
    _BatchNorm.forward, nn.SyncBatchNorm.forward, _InstanceNorm.forward, nn.GroupNorm.forward,
    nn.LayerNorm.forward,
}  # fmt: skip
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


class ConvertError(NormzooError):
    """A model or one of its modules cannot be converted; the message names the module."""


class ConvertWarning(UserWarning):
    """Something a replaced layer held could not be carried over to its replacement."""


def is_normzoo_norm(module: nn.Module) -> bool:
    """A module built by :func:`normzoo.build`: it knows its ``num_features`` and layout."""
    return getattr(module, "layout", None) in LAYOUT_NAMES and hasattr(module, "num_features")


def is_norm_layer(qualified_name: str, module: nn.Module) -> bool:
    """The default ``match``: torch's batch, group, layer and instance norms, and normzoo's."""
    return is_normzoo_norm(module) or isinstance(
        module, (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
    )


def _shape_of(name: str, module: nn.Module) -> tuple[int, str]:
    """``(num_features, layout)`` of a norm layer, or :class:`ConvertError`."""
    if is_normzoo_norm(module):
        return module.num_features, module.layout
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        # over the last dim only: tokens (N, L, C); over (C, H, W): a per-example norm of images
        return (shape[0], "seq") if len(shape) == 1 else (shape[0], "conv")
    for kind, layout in TORCH_LAYOUTS.items():
        if isinstance(module, kind):
            features = module.num_channels if isinstance(module, nn.GroupNorm) else None
            return features or module.num_features, layout
    raise ConvertError(
        f"cannot tell the number of features and layout of {name or 'the model'} "
        f"({type(module).__name__}); select only normalization layers with match="
    )


def _check_replaceable(name: str, module: nn.Module) -> None:
    label = name or "the model itself"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ConvertError(
            f"{label} ({type(module).__name__}) is not initialised yet; run one forward pass "
            "through the model before converting it"
        )
    hooks = [
        kind
        for kind in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )  # fmt: skip
        if getattr(module, kind, None)
    ]
    if hooks:
        raise ConvertError(
            f"{label} ({type(module).__name__}) has {', '.join(h.strip('_') for h in hooks)}; "
            "remove them before converting (they would not move to the new layer)"
        )
    if not is_normzoo_norm(module) and type(module).forward not in _TORCH_FORWARDS:
        raise ConvertError(
            f"{label} ({type(module).__name__}) overrides forward; converting it would drop "
            "that behaviour: exclude it with match="
        )


def _inherited_options(module: nn.Module, declared: set[str], given: Mapping[str, Any]) -> dict:
    options: dict[str, Any] = {}
    for option in ("eps", "momentum", "affine"):
        if option in declared and option not in given and hasattr(module, option):
            value = getattr(module, option)
            if option == "affine" and isinstance(module, nn.LayerNorm):
                value = module.elementwise_affine
            options[option] = value
    if "groups" in declared and "groups" not in given and isinstance(module, nn.GroupNorm):
        options["groups"] = module.num_groups
    return options


def _check_not_scripted(model: nn.Module) -> None:
    """:class:`ConvertError` naming the first TorchScript module in ``model``: its submodules
    cannot be replaced, and ``match`` sees a ``RecursiveScriptModule`` in place of each layer,
    so nothing inside it would be converted, silently."""
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            kind = getattr(module, "original_name", None) or type(module).__name__
            raise ConvertError(
                f"{name or 'the model itself'} ({kind}) is TorchScript, whose layers cannot be "
                "replaced; convert the eager model first, then torch.jit.script or trace it"
            )


def _first_tensor(module: nn.Module, floating: bool = False) -> torch.Tensor | None:
    for tensor in [*module.parameters(), *module.buffers()]:
        if not floating or tensor.is_floating_point():
            return tensor
    return None


def _replacement(
    name: str,
    module: nn.Module,
    norm: str,
    options: Mapping[str, Any],
    lost: list[tuple[str, str]],
    around: tuple[nn.Module, ...] = (),
) -> nn.Module:
    """The new layer for ``module``, with what can be carried over carried over. It goes
    where ``module``'s tensors are (the meta device included), or, for a layer without any
    (an ``InstanceNorm2d`` without affine or running statistics), where those of the first
    module in ``around`` (its parent, the model) that has some are."""
    features, layout = _shape_of(name, module)
    _check_replaceable(name, module)
    declared_norm = registry.info(norm)
    declared = {option.name for option in declared_norm.options}
    resolved = {**_inherited_options(module, declared, options), **options}
    if layout not in declared_norm.layouts:
        raise ConvertError(
            f"{name or 'the model itself'} ({type(module).__name__}) needs layout {layout!r}, "
            f"which norm {norm!r} does not support ({', '.join(declared_norm.layouts)})"
        )
    new = registry.build(norm, features, layout, **resolved)
    around = (module, *around)
    device = next((t.device for m in around if (t := _first_tensor(m)) is not None), None)
    dtype = next((t.dtype for m in around if (t := _first_tensor(m, True)) is not None), None)
    if device is not None or dtype is not None:
        new = new.to(device=device, dtype=dtype)
    if hasattr(new, "carry_over"):  # the norm takes what it needs itself (see convert)
        lost.extend((name, what) for what in new.carry_over(module))
        new.train(module.training)
        return new
    with torch.no_grad():
        for parameter in ("weight", "bias"):
            old_value, new_value = getattr(module, parameter, None), getattr(new, parameter, None)
            if isinstance(old_value, torch.Tensor) and isinstance(new_value, nn.Parameter) and \
                    old_value.shape == new_value.shape:  # fmt: skip
                new_value.copy_(old_value)
                new_value.requires_grad_(old_value.requires_grad)
            elif isinstance(old_value, torch.Tensor):
                lost.append((name, parameter))
        new_buffers = dict(new.named_buffers())
        for buffer, value in module.named_buffers():
            target = new_buffers.get(buffer)
            if target is not None and value is not None and target.shape == value.shape:
                target.copy_(value)
                if hasattr(new, "running_stats_changed"):
                    new.running_stats_changed()
            elif value is not None and buffer in _RUNNING:
                lost.append((name, buffer))
    if getattr(module, "track_running_stats", True) is False and hasattr(
        new, "running_stats_changed"
    ):
        lost.append((name, "batch statistics in eval (track_running_stats=False)"))
    new.train(module.training)
    return new


def convert(
    model: nn.Module,
    name: str,
    *,
    match: Callable[[str, nn.Module], bool] | None = None,
    **options: Any,
) -> nn.Module:
    """Replace every normalization layer of ``model`` by norm ``name``, in place.

    Parameters
    ----------
    model:
        Any module, e.g. ``torchvision.models.resnet18()``, or a norm layer itself (then the
        replacement is returned). Not one wrapped in ``DistributedDataParallel``: convert
        first, then wrap.
    name:
        A registered norm; ``options`` are its options. ``eps``, ``momentum``, ``affine`` (and
        ``groups`` from a ``GroupNorm``) are taken from each replaced layer unless given.
    match:
        ``match(qualified_name, module)`` selects the layers to replace; the default
        (:func:`is_norm_layer`) takes torch's batch, group, layer and instance norms and every
        normzoo norm.

    Returns the converted model (the same object unless ``model`` itself was replaced). Each
    new layer gets the old one's device, dtype, ``training`` flag, affine parameters (with
    their ``requires_grad``) and the running statistics that share a name and shape (so that
    ``batchnorm`` and torch's batch norm convert into each other with the same numbers); a
    model on the meta device converts into one on the meta device (``to_empty`` and a state
    dict then give it values). A
    layer shared by several parents is replaced once, by one new layer. A :class:`ConvertWarning`
    lists what could not be carried over. Build the optimizer after converting: it would
    otherwise hold the old layers' parameters.

    A norm that holds what it carries over in another form (``frozenbn``: the affine in
    buffers, not parameters) defines ``carry_over(old) -> list[str]``; when the new layer has
    it, convert calls it with the replaced layer instead of copying as above, and the warning
    lists the names it returns (what it could not take).

    Raises :class:`ConvertError` for a model wrapped in DDP or ``DataParallel``, for a model
    that is or holds a TorchScript module (``torch.jit.script`` or ``trace``: convert before
    scripting), and for a selected layer with hooks or a ``forward`` of its own (torch's
    converter drops both silently), or whose layout the norm does not support.
    """
    if not isinstance(model, nn.Module) or not isinstance(name, str):
        raise TypeError(
            "convert(model, name, **options) takes the model first and the norm's name second, "
            f"got {type(model).__name__} and {type(name).__name__}"
        )
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ConvertError(
            f"the model is wrapped in {type(model).__name__}; convert model.module, then wrap "
            "the converted model"
        )
    registry.info(name)  # an unknown name fails before anything changes
    _check_not_scripted(model)
    match = match or is_norm_layer
    lost: list[tuple[str, str]] = []
    if match("", model):
        replacement = _replacement("", model, name, options, lost)
        _report([""], name, lost)
        return replacement
    # every replacement is built before the first is put in: an error leaves the model as it was
    new_of: dict[int, nn.Module] = {}
    places: list[tuple[nn.Module, str, nn.Module]] = []
    replaced: list[str] = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) not in new_of and match(qualified, child):
                new_of[id(child)] = _replacement(
                    qualified, child, name, options, lost, (parent, model)
                )
                replaced.append(qualified)
            if id(child) in new_of:
                places.append((parent, child_name, child))
    for parent, child_name, child in places:
        setattr(parent, child_name, new_of[id(child)])
    _report(replaced, name, lost)
    return model


def _report(replaced: list[str], name: str, lost: list[tuple[str, str]]) -> None:
    log.info("normzoo.convert: replaced %d layers by %r: %s", len(replaced), name,
             ", ".join(n or "(the model)" for n in replaced))  # fmt: skip
    if lost:
        by_what: dict[str, list[str]] = {}
        for layer, what in lost:
            by_what.setdefault(what, []).append(layer or "(the model)")
        parts = []
        for what, layers in by_what.items():
            more = f", ... {len(layers) - 3} more" if len(layers) > 3 else ""
            parts.append(f"{what} of {len(layers)} layer(s) ({', '.join(layers[:3])}{more})")
        warnings.warn(
            f"normzoo.convert: replaced {len(replaced)} layers by {name!r}; could not carry "
            f"over (no counterpart of the same shape in {name!r}): {'; '.join(parts)}",
            ConvertWarning,
            stacklevel=3,
        )
