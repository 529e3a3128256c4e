"""LeNet-5 with a normalization slot after every conv and hidden fc layer (D2L 8.5 / 7.5).

::

    conv 5x5, 6  -> norm -> act -> avgpool 2     (28 -> 24 -> 12)
    conv 5x5, 16 -> norm -> act -> avgpool 2     (12 ->  8 ->  4)
    flatten 256 -> fc 120 -> norm -> act [-> dropout]
                -> fc 84  -> norm -> act [-> dropout]
                -> fc 10

The norms are built through :func:`normzoo.build`, so any registered norm fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

import normzoo
from normzoo.errors import NormzooError, OptionError, suggest

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
#: Which layers get a norm: ``all``, only the ``conv`` ones, only the ``fc`` ones, or ``none``.
PLACEMENTS = ("all", "conv", "fc", "none")
#: Attribute of a model from :func:`build_lenet` that names its norm children, in order.
NORMS_ATTRIBUTE = "normzoo_norms"
_NOT_NORMS = (
    nn.Sequential, nn.Conv2d, nn.Linear, nn.Sigmoid, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d,
    nn.Flatten, nn.Dropout,
)  # fmt: skip


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every norm in ``model``, in order.

    The harness checks the norms specifically (shapes in a trial batch, which module's
    statistics went bad) and must tell them apart from LeNet's own layers without knowing
    any norm's class. :func:`build_lenet` records their names in :data:`NORMS_ATTRIBUTE` (a
    plain attribute: the ``state_dict`` keys stay those of normzoo 0.1.0); for any other
    model, every module that is not a plain torch layer counts as a norm.
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


#: The channels of LeNet's layers that a norm can follow, by layout (the model is built from
#: them).
NORMALIZED_CHANNELS = {"conv": (6, 16), "fc": (120, 84)}


def _check_options_fit_every_layer(
    info: normzoo.NormInfo, given: Mapping[str, Any], resolved: Mapping[str, Any], placement: str
) -> None:
    """Refuse options that one of the normalized layers' channel counts rejects, naming the
    values of a given integer option that every layer accepts.

    Without this, each error suggested the values that fit its own layer (``groups`` dividing
    6: 1, 2, 3, 6), and the next layer then refused the one taken (3 does not divide 16).
    """
    counts = [c for layout, cs in NORMALIZED_CHANNELS.items() if placement in ("all", layout)
              for c in cs]  # fmt: skip

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
    where = f"LeNet normalizes layers of {layers} channels with placement {placement!r}"
    raise OptionError(f"{failure} ({where}{fit})")


def build_lenet(
    norm: str = "batchnorm",
    norm_options: Mapping[str, Any] | None = None,
    activation: str = "sigmoid",
    placement: str = "all",
    bias_before_norm: bool = True,
    dropout: float = 0.0,
    freeze_affine: bool = False,
) -> nn.Sequential:
    """Build LeNet with norm ``norm`` in the slots that ``placement`` selects.

    Parameters
    ----------
    norm, norm_options:
        Registered norm name and its options (typed values or strings).
    activation:
        ``sigmoid`` (the chapter's) or ``relu``.
    placement:
        One of :data:`PLACEMENTS`.
    bias_before_norm:
        Keep the bias of the conv/fc layer that feeds a norm; a norm that subtracts a mean
        makes that bias redundant, which one of the chapter's exercises asks about.
    dropout:
        Probability of the dropout after each hidden fc layer; 0 for none.
    freeze_affine:
        Keep every norm's gamma at 1 and beta at 0 (the chapter's exercise on the role of
        gamma and beta) by building the norms with their ``affine`` option set to false; a
        norm with learnable parameters and no ``affine`` option is an error.
    """
    if activation not in ACTIVATIONS:
        raise NormzooError(suggest("activation", activation, ACTIVATIONS))
    if placement not in PLACEMENTS:
        raise NormzooError(suggest("placement", placement, PLACEMENTS))
    if not 0.0 <= dropout < 1.0:
        raise NormzooError(f"dropout must be in [0, 1), got {dropout!r}")
    options = dict(norm_options or {})
    info = normzoo.info(norm)  # fail early on an unknown name, even with placement "none"
    resolved = info.resolve_options(options)  # a bad option is one line before anything is built
    _check_options_fit_every_layer(info, options, resolved, placement)
    for layout in ("conv", "fc"):
        if placement in ("all", layout) and layout not in info.layouts:
            other = "conv" if layout == "fc" else "fc"
            way_out = f"use --placement {other}" if other in info.layouts else "choose another norm"
            raise NormzooError(
                f"norm {norm!r} does not support layout {layout!r} (LeNet's {layout} layers; "
                f"it supports {', '.join(info.layouts)}); {way_out}"
            )
    if freeze_affine:
        options.update(frozen_affine_options(info, options))

    norms: list[nn.Module] = []

    def build_norm(features: int, layout: str) -> nn.Module:
        module = normzoo.build(norm, features, layout, **options)  # errors are one line
        if freeze_affine and any(True for _ in module.parameters()):
            raise NormzooError(
                f"norm {norm!r} still has learnable parameters with affine=False; "
                "--freeze-affine needs a norm whose 'affine' option removes them"
            )
        norms.append(module)
        return module

    def block(layer: nn.Module, features: int, layout: str) -> list[nn.Module]:
        normalized = placement in ("all", layout)
        if normalized and not bias_before_norm:
            layer.bias = None
        modules = [layer]
        if normalized:
            modules.append(build_norm(features, layout))
        modules.append(ACTIVATIONS[activation]())
        return modules

    def dropout_layer() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout > 0 else []

    (conv1, conv2), (fc1, fc2) = NORMALIZED_CHANNELS["conv"], NORMALIZED_CHANNELS["fc"]
    model = nn.Sequential(
        *block(nn.Conv2d(1, conv1, kernel_size=5), conv1, "conv"),
        nn.AvgPool2d(kernel_size=2, stride=2),
        *block(nn.Conv2d(conv1, conv2, kernel_size=5), conv2, "conv"),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        *block(nn.Linear(conv2 * 4 * 4, fc1), fc1, "fc"),
        *dropout_layer(),
        *block(nn.Linear(fc1, fc2), fc2, "fc"),
        *dropout_layer(),
        nn.Linear(fc2, 10),
    )
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)  # the book's init_cnn
    setattr(
        model,
        NORMS_ATTRIBUTE,
        tuple(name for name, child in model.named_children() if any(child is n for n in norms)),
    )
    return model


def frozen_affine_options(info: normzoo.NormInfo, options: Mapping[str, Any]) -> dict[str, Any]:
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


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message: torch's errors run to many lines, a harness
    error is one, and the full text stays on the chained ``__cause__``."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""
