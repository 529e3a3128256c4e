"""Layouts: how an input's dimensions are arranged, as objects every part of normzoo asks.

A norm declares the layouts it accepts; a :class:`Layout` says how many dimensions such an input
has, which one holds the channels, which dimensions per-channel statistics reduce over, which
dimensions make up one example (for per-example norms such as layer norm), and which shapes the
conformance suite tests. Input checks, :mod:`normzoo.stats`, :func:`normzoo.build` and
:mod:`normzoo.testing` all go through these objects, so a new layout is one entry here.

========  ===================  ===========================================================
name      input                used for
========  ===================  ===========================================================
fc        ``(N, C)``           output of a linear layer
conv1d    ``(N, C, L)``        output of a 1-d convolution (audio, time series)
conv      ``(N, C, H, W)``     output of a 2-d convolution; also accepted as ``conv2d``
conv3d    ``(N, C, D, H, W)``  output of a 3-d convolution (video, volumes)
seq       ``(N, L, C)``        token sequences, channels last, as transformers use them
========  ===================  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normzoo.errors import LayoutError, suggest


@dataclass(frozen=True)
class Layout:
    """One input layout.

    Parameters
    ----------
    name:
        Canonical name, what factories receive as ``layout``.
    dims:
        One letter per dimension, e.g. ``"NCHW"``; ``N`` is the batch, ``C`` the channels.
    description:
        A few words for listings.
    test_sizes:
        Sizes of the non-batch, non-channel dimensions in the conformance suite's inputs.
    """

    name: str
    dims: str
    description: str
    test_sizes: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        """Number of dimensions of an input."""
        return len(self.dims)

    @property
    def channel_axis(self) -> int:
        """Index of the channel dimension: 1, or ``ndim - 1`` for channels-last ``seq``."""
        return self.dims.index("C")

    @property
    def channels_last(self) -> bool:
        """True when the channels are the last dimension (``seq``)."""
        return self.channel_axis == self.ndim - 1 and self.ndim > 2

    @property
    def shape_text(self) -> str:
        """The shape in words, e.g. ``(N, C, H, W)``."""
        return "(" + ", ".join(self.dims) + ")"

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """Dimensions that per-channel (batch) statistics reduce over: all but the channels."""
        return tuple(d for d in range(self.ndim) if d != self.channel_axis)

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Dimensions other than batch and channels: what instance norm reduces over."""
        return tuple(d for d in range(1, self.ndim) if d != self.channel_axis)

    @property
    def example_dims(self) -> tuple[int, ...]:
        """What a per-example norm (layer norm, RMS norm) normalizes over, for one example.

        Every non-batch dimension for the channels-first layouts; for ``seq`` only the channels,
        since each token is normalized on its own, as in transformers (``nn.LayerNorm(C)``).
        """
        return (self.channel_axis,) if self.channels_last else tuple(range(1, self.ndim))

    def channel_shape(self, num_features: int) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against an input of this layout."""
        return tuple(num_features if d == self.channel_axis else 1 for d in range(self.ndim))

    def values_per_channel(self, x: torch.Tensor) -> int:
        """How many values each channel has in ``x``: ``N`` times the other sizes."""
        return x.numel() // max(x.shape[self.channel_axis], 1)

    def test_shape(self, num_features: int, batch: int) -> tuple[int, ...]:
        """Input shape with ``batch`` examples, ``num_features`` channels and the test sizes."""
        sizes = iter(self.test_sizes)
        return tuple(
            batch if d == "N" else num_features if d == "C" else next(sizes) for d in self.dims
        )

    def single_value_shape(self, num_features: int) -> tuple[int, ...]:
        """Input shape with exactly one value per channel."""
        return tuple(num_features if d == "C" else 1 for d in self.dims)

    def check_input(self, x: object, num_features: int, norm: str) -> None:
        """Raise :class:`LayoutError` unless ``x`` is a tensor of this layout with
        ``num_features`` channels; the message names the norm, the layout and the shape."""
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if (
            shape is None
            or len(shape) != self.ndim
            or shape[self.channel_axis] != num_features
            or not x.is_floating_point()
        ):
            got = f"shape {shape}" if shape is not None else f"a {type(x).__name__}"
            if shape is not None and not x.is_floating_point():
                got += f" of dtype {x.dtype} (use a floating-point tensor)"
            raise LayoutError(
                f"norm {norm!r} built for layout {self.name!r} with {num_features} features "
                f"expects input {self.shape_text} with C={num_features}, got {got}"
            )

    def to_channel_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as a ``(C, m)`` matrix, ``m`` = values per channel."""
        return x.movedim(self.channel_axis, 0).reshape(x.shape[self.channel_axis], -1)

    def from_channel_matrix(self, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_channel_matrix`: ``(C, m)`` back to the shape of ``like``."""
        moved = like.movedim(self.channel_axis, 0).shape
        return matrix.reshape(moved).movedim(0, self.channel_axis)

    def to_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, C) -> (N, C, L)`` for ``seq``; other layouts are already channels-first."""
        return x.movedim(self.channel_axis, 1)

    def from_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_channels_first`."""
        return x.movedim(1, self.channel_axis)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("fc", "NC", "output of a linear layer"),
        Layout("conv1d", "NCL", "output of a 1-d convolution", (5,)),
        Layout("conv", "NCHW", "output of a 2-d convolution", (3, 3)),
        Layout("conv3d", "NCDHW", "output of a 3-d convolution", (2, 2, 2)),
        Layout("seq", "NLC", "token sequence, channels last (transformers)", (5,)),
    )
}
#: Other names accepted for a layout.
ALIASES: dict[str, str] = {"conv2d": "conv"}
#: Layout names in their canonical order.
LAYOUT_NAMES: tuple[str, ...] = tuple(LAYOUTS)


def get_layout(name: str | Layout) -> Layout:
    """The layout called ``name`` (or an alias of it); :class:`LayoutError` lists valid names."""
    if isinstance(name, Layout):
        return name
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    try:
        return LAYOUTS[key]
    except (KeyError, TypeError):
        raise LayoutError(suggest("layout", str(name), [*LAYOUTS, *ALIASES])) from None
