"""What every workload shares: the settings of a run's model, the norm slots a workload's model
is built with, and how the harness tells the norms of a model apart from its other layers.

A workload (see :class:`~normzoo.interface.WorkloadInfo`) declares its norm :class:`Slot` s
and a factory that builds the model from a :class:`NormSlots`: for each slot the factory hands
over the layer that feeds it, and gets back that layer, the norm (where the placement puts
one) and the activation. So the settings that shape every model the same way (which slots get
a norm, the activation, the bias before a norm, dropout, frozen affine parameters) are applied
here once, for every workload, and :func:`build_model` checks everything that can be checked
(names, layouts, options against every slot's channel count) before a module is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from normzoo import registry
from normzoo.errors import NormzooError, OptionError, call_plugin, suggest
from normzoo.interface import NormInfo, Slot, WorkloadInfo

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
#: Placements beyond a slot layout (``conv``: only the slots of that layout get a norm).
EVERY_SLOT, NO_SLOT = "all", "none"
#: Attribute of a model from :func:`build_model` that names its norm children, in order.
NORMS_ATTRIBUTE = "normzoo_norms"
#: The torch layers a workload's model is made of besides its norms: for a model that was not
#: built by :func:`build_model`, every other module counts as a norm.
_NOT_NORMS = (
    nn.Sequential, nn.Conv2d, nn.Linear, nn.Sigmoid, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d,
    nn.Flatten, nn.Dropout,
)  # fmt: skip


@dataclass(frozen=True)
class ModelSettings:
    """What a run's model is: the workload, the norm in its slots and how the slots are filled.

    The defaults are the chapter's: LeNet with batch norm after every conv and hidden fc
    layer, sigmoid activations, no dropout.
    """

    workload: str = field(
        default="lenet", metadata={"help": "registered workload (see `normzoo workloads`)"}
    )
    norm: str = field(
        default="batchnorm", metadata={"help": "registered norm (see `normzoo list`)"}
    )
    #: The norm's options, typed values or strings (``normzoo info NAME``).
    norm_options: dict[str, Any] = field(default_factory=dict)
    activation: str = field(
        default="sigmoid",
        metadata={"help": "activation after each norm slot", "choices": tuple(ACTIVATIONS)},
    )
    placement: str = field(
        default=EVERY_SLOT,
        metadata={
            "help": "which slots get a norm: all, none, or the slots of one layout (LeNet: conv "
            "or fc)"
        },
    )
    bias_before_norm: bool = field(
        default=True, metadata={"flag": "drop the bias of the layers that feed a norm"}
    )
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout probability where the workload puts dropout (LeNet, mlp: "
            "after each hidden fc layer)"
        },
    )
    freeze_affine: bool = field(
        default=False,
        metadata={
            "help": "keep every norm's gamma at 1 and beta at 0 (builds the norms with "
            "affine=false)"
        },
    )

    def resolved_norm_options(self) -> dict[str, Any]:
        """Every option of the norm, converted, defaults filled in, ``affine`` off where
        ``freeze_affine`` asks for it. Raises the registry's one-line errors."""
        info = registry.info(self.norm)
        options = dict(self.norm_options)
        if self.freeze_affine:
            options.update(frozen_affine_options(info, options))
        return info.resolve_options(options)


def placements(workload: WorkloadInfo) -> tuple[str, ...]:
    """The placements ``workload`` takes: all slots, none, or the slots of one layout."""
    return (EVERY_SLOT, *workload.layouts, NO_SLOT)


def placed_slots(workload: WorkloadInfo, placement: str) -> tuple[Slot, ...]:
    """The slots that get a norm with ``placement``."""
    return tuple(slot for slot in workload.slots if placement in (EVERY_SLOT, slot.layout))


def frozen_affine_options(info: NormInfo, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that keep norm ``info``'s gamma at 1 and beta at 0: ``affine=False`` where
    the norm declares that option, nothing for a norm without one (which must then have no
    parameters at all). Contradicting ``affine=true`` is an error."""
    if not info.has_option("affine"):
        return {}
    given = options.get("affine")
    if given is not None and info.option("affine").convert(given, info.name):
        raise NormzooError(
            f"--freeze-affine contradicts --norm-opt affine={given}; drop one of them"
        )
    return {"affine": False}


def _check_options_fit_every_slot(
    info: NormInfo,
    given: Mapping[str, Any],
    resolved: Mapping[str, Any],
    workload: WorkloadInfo,
    placement: str,
) -> None:
    """Refuse options that one of the placed slots' channel counts rejects, naming the values
    of a given integer option that every slot accepts.

    Without this, each error suggested the values that fit its own slot (``groups`` dividing
    6: 1, 2, 3, 6), and the next slot then refused the one taken (3 does not divide 16).
    """
    counts = [slot.channels for slot in placed_slots(workload, placement)]
    if not counts:
        return

    def rejection(options: Mapping[str, Any]) -> OptionError | None:
        try:
            for count in counts:
                info.check_options(options, count)
        except OptionError as error:
            return error
        return None

    failure = rejection(resolved)
    if failure is None:
        return
    fitting = {
        key: [v for v in range(1, max(counts) + 1) if rejection({**resolved, key: v}) is None]
        for key in given
        if isinstance(resolved.get(key), int) and not isinstance(resolved[key], bool)
    }
    hints = [f"{key} = {', '.join(map(str, values))}" for key, values in fitting.items() if values]
    layers = ", ".join(map(str, counts))
    fit = f"; values that fit all of them: {'; '.join(hints)}" if hints else ""
    where = f"{workload.name} normalizes layers of {layers} channels with placement {placement!r}"
    raise OptionError(f"{failure} ({where}{fit})")


def check_model_settings(settings: ModelSettings) -> WorkloadInfo:
    """Every check of ``settings`` that needs no module built; returns the workload.

    An unknown workload, norm, activation, placement or option, a dropout out of range, a norm
    that lacks a placed slot's layout, or an option that a placed slot's channel count rejects
    is one line naming it.
    """
    workload = registry.workload(settings.workload)
    if settings.activation not in ACTIVATIONS:
        raise NormzooError(suggest("activation", settings.activation, ACTIVATIONS))
    if settings.placement not in placements(workload):
        raise NormzooError(
            f"{suggest('placement', settings.placement, placements(workload))} "
            f"(workload {workload.name!r} has {', '.join(workload.layouts)} slots)"
        )
    if not 0.0 <= settings.dropout < 1.0:
        raise NormzooError(f"dropout must be in [0, 1), got {settings.dropout!r}")
    info = registry.info(settings.norm)  # an unknown name fails even with placement "none"
    resolved = settings.resolved_norm_options()  # a bad option is one line before any build
    _check_options_fit_every_slot(
        info, settings.norm_options, resolved, workload, settings.placement
    )
    for layout in dict.fromkeys(s.layout for s in placed_slots(workload, settings.placement)):
        if layout not in info.layouts:
            fitting = [other for other in workload.layouts if other in info.layouts]
            way_out = f"use --placement {fitting[0]}" if fitting else "choose another norm"
            raise NormzooError(
                f"norm {settings.norm!r} does not support layout {layout!r} ({workload.name}'s "
                f"{layout} slots; it supports {', '.join(info.layouts)}); {way_out}"
            )
    return workload


class NormSlots:
    """What a workload's factory builds its model with: one :meth:`block` per slot.

    Made by :func:`build_model`; a factory uses :meth:`block` for each declared slot, in
    order of use, exactly once (checked when the model is finished).
    """

    def __init__(self, workload: WorkloadInfo, settings: ModelSettings) -> None:
        self.workload = workload
        self.settings = settings
        self._options = settings.resolved_norm_options()
        self._placed = {slot.name for slot in placed_slots(workload, settings.placement)}
        self._used: list[str] = []
        self._norms: list[nn.Module] = []

    def slot(self, name: str) -> Slot:
        """The declared slot ``name``: its channels, layout and input size."""
        return self.workload.slot(name)

    def block(self, name: str, layer: nn.Module) -> list[nn.Module]:
        """``layer`` (which feeds slot ``name``), the norm if the placement puts one there,
        and the activation.

        ``layer`` must produce the slot's channel count (its ``out_channels`` or
        ``out_features``); its bias is dropped when a norm follows and ``bias_before_norm``
        is off.
        """
        slot = self.slot(name)
        if name in self._used:
            raise NormzooError(f"workload {self.workload.name!r} uses slot {name!r} twice")
        self._used.append(name)
        width = getattr(layer, "out_channels", getattr(layer, "out_features", slot.channels))
        if width != slot.channels:
            raise NormzooError(
                f"workload {self.workload.name!r}: slot {name!r} declares {slot.channels} "
                f"channels, but the layer that feeds it produces {width}"
            )
        modules = [layer]
        if name in self._placed:
            if not self.settings.bias_before_norm:
                layer.bias = None
            modules.append(self._norm(slot))
        modules.append(ACTIVATIONS[self.settings.activation]())
        return modules

    def dropout(self) -> list[nn.Module]:
        """The dropout layer the settings ask for after a hidden layer; none for 0."""
        return [nn.Dropout(self.settings.dropout)] if self.settings.dropout > 0 else []

    def _norm(self, slot: Slot) -> nn.Module:
        norm = registry.build(self.settings.norm, slot.channels, slot.layout, **self._options)
        if self.settings.freeze_affine and any(True for _ in norm.parameters()):
            names = ", ".join(name for name, _ in norm.named_parameters())
            how = "with affine=False" if "affine" in self._options else "and no 'affine' option"
            raise NormzooError(
                f"norm {self.settings.norm!r} still learns {names} {how}; --freeze-affine needs "
                "a norm whose learnable parameters are all gamma and beta"
            )
        self._norms.append(norm)
        return norm

    def finish(self, model: nn.Module) -> nn.Module:
        """Check that every slot was used and record the norms' names on ``model``."""
        unused = [slot.name for slot in self.workload.slots if slot.name not in self._used]
        if unused:
            raise NormzooError(
                f"workload {self.workload.name!r} declares slot(s) {', '.join(unused)} that its "
                "factory never filled; call slots.block(name, layer) once per declared slot"
            )
        names = [
            name for name, module in model.named_modules()
            if any(module is norm for norm in self._norms)
        ]  # fmt: skip
        # a plain attribute: the state_dict keys stay those of the model without it
        setattr(model, NORMS_ATTRIBUTE, tuple(names))
        return model


def build_model(settings: ModelSettings) -> nn.Module:
    """The model of ``settings``: its workload's, with the norm in the slots the placement
    selects; every setting is checked first (:func:`check_model_settings`)."""
    workload = check_model_settings(settings)
    slots = NormSlots(workload, settings)
    where = f"workload {workload.name!r} (plugin {workload.plugin!r})"
    model = call_plugin(
        workload.factory, lambda text: NormzooError(f"{where}: its factory raised {text}"), slots
    )
    if not isinstance(model, nn.Module):
        raise NormzooError(
            f"workload {workload.name!r}: its factory returned {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return slots.finish(model)


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every norm in ``model``, in order.

    The harness checks the norms specifically (shapes in a trial batch, which module's
    statistics went bad) and must tell them apart from the model's own layers without knowing
    any norm's class. :func:`build_model` records their names in :data:`NORMS_ATTRIBUTE`; for
    any other model, every module that is not a plain torch layer counts as a norm.
    """
    names = getattr(model, NORMS_ATTRIBUTE, None)
    if names is not None:
        modules = dict(model.named_modules())
        return [(name, modules[name]) for name in names]
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and type(module) not in _NOT_NORMS
    ]
