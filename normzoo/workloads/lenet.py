"""``lenet``: LeNet-5 on Fashion-MNIST, the chapter's model (D2L 8.5 / 7.5), the default
workload. A norm slot follows every conv and hidden fc layer::

    conv 5x5, 6  -> norm -> act -> avgpool 2     (28 -> 24 -> 12)
    conv 5x5, 16 -> norm -> act -> avgpool 2     (12 ->  8 ->  4)
    flatten 256 -> fc 120 -> norm -> act [-> dropout]
                -> fc 84  -> norm -> act [-> dropout]
                -> fc 10

The layers are built in this order and initialised as the book's ``init_cnn`` does (Xavier
uniform weights), so a seed gives the numbers it gave before workloads existed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normzoo.hookspecs import hookimpl
from normzoo.interface import Slot, WorkloadInfo
from normzoo.workloads.data import load_fashion_mnist
from normzoo.workloads.slots import NormSlots

NAME = "lenet"
SLOTS = (
    Slot("conv1", 6, "conv", (24, 24)),
    Slot("conv2", 16, "conv", (8, 8)),
    Slot("fc1", 120, "fc"),
    Slot("fc2", 84, "fc"),
)


def build(slots: NormSlots) -> nn.Sequential:
    """LeNet with the norms of ``slots``; the widths are the slots' channel counts."""
    conv1, conv2, fc1, fc2 = (slot.channels for slot in SLOTS)
    flat = conv2 * 4 * 4  # conv2's 4x4 maps after the second pooling
    model = nn.Sequential(
        *slots.block("conv1", nn.Conv2d(1, conv1, kernel_size=5)),
        nn.AvgPool2d(kernel_size=2, stride=2),
        *slots.block("conv2", nn.Conv2d(conv1, conv2, kernel_size=5)),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        *slots.block("fc1", nn.Linear(flat, fc1)),
        *slots.dropout(),
        *slots.block("fc2", nn.Linear(fc1, fc2)),
        *slots.dropout(),
        nn.Linear(fc2, 10),
    )
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)  # the book's init_cnn
    return model


WORKLOAD = WorkloadInfo(
    name=NAME,
    summary="LeNet-5 on Fashion-MNIST, a norm after each conv and hidden fc layer (the book's)",
    slots=SLOTS,
    factory=build,
    data=load_fashion_mnist,
    reference="Dive into Deep Learning, sections 7.5 (batch norm) and 8.5 (LeNet)",
)


@hookimpl
def normzoo_register_workloads(register: Callable[[WorkloadInfo], None]) -> None:
    register(WORKLOAD)
