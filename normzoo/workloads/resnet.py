"""``resnet``: a small residual network for the 28x28 Fashion-MNIST images, in the original
(post-activation) ordering of He et al. (2016): ``conv -> norm -> act`` inside a block, the
residual added *before* the block's last activation. A norm slot (layout ``conv``) follows
every convolution, the 1x1 projection shortcuts' included::

    stem     conv 3x3, 16              -> norm -> act                    28x28
    stage 1  2 basic blocks, 16 channels                                 28x28
    stage 2  2 basic blocks, 32 channels (the first strides 2, with a    14x14
             projection shortcut: conv 1x1 stride 2 -> norm)
    stage 3  2 basic blocks, 64 channels (likewise)                        7x7
    global average pool -> [dropout ->] fc 10

    basic block:  act( norm(conv3x3(act(norm(conv3x3(x))))) + shortcut(x) )
    shortcut:     x, or norm(conv1x1 stride 2 (x)) where the width or the size changes

The CIFAR ResNet of the paper's section 4.2 with 2 blocks per stage instead of 3 (ResNet-14
rather than ResNet-20) and a one-channel stem: 15 norm slots, 175,530 parameters with batch
norm in them (the convolutions keep their biases unless ``--no-bias-before-norm``). The
convolutions are initialised Kaiming normal (fan out, as torchvision's ResNet) with zero
biases, the fc layer as torch's default.

The activation after every norm, and after each residual addition, is the run's
``--activation``: ReLU by the workload's default, the paper's network; the projection norms are
followed by none (the addition's comes next). ``--dropout`` goes before the fc layer.

Defaults (:attr:`WORKLOAD` ``.defaults``, used where a run sets none): ``activation="relu"``,
``lr=0.3``, tuned once for ``batchnorm`` with plain SGD, batch 256 (docs/workloads.md has the
measurements); the other settings are the harness's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normzoo.hookspecs import hookimpl
from normzoo.interface import Slot, WorkloadInfo
from normzoo.workloads.data import IMAGE_SIZE, load_fashion_mnist
from normzoo.workloads.slots import NormSlots

NAME = "resnet"
#: Channels of the stem and of each stage, and the basic blocks per stage.
STEM, WIDTHS, BLOCKS = 16, (16, 32, 64), 2


def _declare() -> tuple[Slot, ...]:
    """Every norm slot in the order the model uses them: the stem's, then per block its two
    convolutions' and, in a block that changes width or size, its projection shortcut's."""
    slots = [Slot("stem", STEM, "conv", IMAGE_SIZE)]
    channels, size = STEM, IMAGE_SIZE[0]
    for stage, width in enumerate(WIDTHS, 1):
        for block in range(1, BLOCKS + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            size = -(-size // stride)  # a 3x3 conv with padding 1: ceil(size / stride)
            prefix = f"s{stage}b{block}"
            slots += [Slot(f"{prefix}_conv{i}", width, "conv", (size, size)) for i in (1, 2)]
            if stride != 1 or channels != width:
                slots.append(Slot(f"{prefix}_shortcut", width, "conv", (size, size)))
            channels = width
    return tuple(slots)


SLOTS = _declare()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a norm after each, the residual added before the second
    activation (post-activation ordering); a projection shortcut where the shape changes."""

    def __init__(self, slots: NormSlots, prefix: str, in_channels: int, stride: int) -> None:
        super().__init__()
        width = slots.slot(f"{prefix}_conv1").channels
        conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=stride, padding=1)
        conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1)
        first = slots.block(f"{prefix}_conv1", conv1)
        # conv2's norm ends the branch; its activation comes after the addition
        *second, activation = slots.block(f"{prefix}_conv2", conv2)
        self.branch = nn.Sequential(*first, *second)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != width:
            projection = nn.Conv2d(in_channels, width, kernel_size=1, stride=stride)
            # no activation after the projection's norm: the addition's follows
            *shortcut, _ = slots.block(f"{prefix}_shortcut", projection)
            self.shortcut = nn.Sequential(*shortcut)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.branch(x) + self.shortcut(x))


def build(slots: NormSlots) -> nn.Sequential:
    """The residual network with the norms of ``slots``; the widths are the slots'."""
    layers: list[nn.Module] = [
        *slots.block("stem", nn.Conv2d(1, STEM, kernel_size=3, padding=1)),
    ]
    channels = STEM
    for stage, width in enumerate(WIDTHS, 1):
        for block in range(1, BLOCKS + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            layers.append(BasicBlock(slots, f"s{stage}b{block}", channels, stride))
            channels = width
    model = nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        *slots.dropout(),
        nn.Linear(channels, 10),
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


WORKLOAD = WorkloadInfo(
    name=NAME,
    summary="ResNet-14 on Fashion-MNIST: 3 stages of 16/32/64 channels, 2 basic blocks each, "
    "a norm after every conv (post-activation)",
    slots=SLOTS,
    factory=build,
    data=load_fashion_mnist,
    reference="He et al., Deep Residual Learning for Image Recognition, CVPR 2016, section 4.2 "
    "(CIFAR-10 ResNets; 2 blocks per stage)",
    # tuned once for batchnorm on the validation split (docs/workloads.md): a ReLU network, as
    # the paper's, which trains best at a smaller step than the sigmoid LeNet's
    defaults={"activation": "relu", "lr": 0.3},
)


@hookimpl
def normzoo_register_workloads(register: Callable[[WorkloadInfo], None]) -> None:
    register(WORKLOAD)
