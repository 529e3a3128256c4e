"""``mlp``: the multilayer perceptron of the decorrelated batch-norm experiments on the bundled
Fashion-MNIST: 4 hidden layers of 256 units, a norm slot (layout ``fc``) after each::

    flatten 784 -> fc 256 -> norm -> act [-> dropout]   (x 4)
                -> fc 10

Weights are initialised Xavier uniform, as LeNet's.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normzoo.hookspecs import hookimpl
from normzoo.interface import Slot, WorkloadInfo
from normzoo.workloads.data import IMAGE_SIZE, load_fashion_mnist
from normzoo.workloads.slots import NormSlots

NAME = "mlp"
SLOTS = tuple(Slot(f"fc{index}", 256, "fc") for index in range(1, 5))


def build(slots: NormSlots) -> nn.Sequential:
    """The MLP with the norms of ``slots``; the widths are the slots' channel counts."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = IMAGE_SIZE[0] * IMAGE_SIZE[1]
    for slot in SLOTS:
        layers += [*slots.block(slot.name, nn.Linear(width, slot.channels)), *slots.dropout()]
        width = slot.channels
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
    return model


WORKLOAD = WorkloadInfo(
    name=NAME,
    summary="MLP on Fashion-MNIST: 4 hidden fc layers of 256 units, a norm after each",
    slots=SLOTS,
    factory=build,
    data=load_fashion_mnist,
    reference="Huang et al., Decorrelated Batch Normalization, CVPR 2018, section 5.1 (MLP)",
)


@hookimpl
def normzoo_register_workloads(register: Callable[[WorkloadInfo], None]) -> None:
    register(WORKLOAD)
