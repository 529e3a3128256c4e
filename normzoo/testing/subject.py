"""What a conformance check tests: a :class:`Subject`, one norm with the registry it is in and
the options and channel count to build it with.

Every check receives the norm this way, so that all of them build it alike (one place applies
the caller's options and channel count) and name it alike in their failures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from normzoo.interface import NormInfo
from normzoo.layouts import Layout, get_layout
from normzoo.registry import Registry

#: Channels of the test inputs unless the caller gives ``num_features``.
NUM_FEATURES = 4
#: Channels of the (smaller) gradcheck inputs unless the caller gives ``num_features``;
#: gradcheck costs two forwards per input element.
GRADCHECK_FEATURES = 2


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
