"""``transformer``: a small vision transformer over Fashion-MNIST, pre-norm (Xiong et al. 2020):
each 28x28 image cut into 16 patches of 7x7 pixels, the 16 tokens of width 64 through 2
blocks, a norm slot (layout ``seq``, input ``(N, 16, 64)``) before each attention, before
each MLP and before the head::

    patches 16 x 49 -> fc 64 (+ learned position embedding, one per patch)  (N, 16, 64)
    2 blocks:  x = x + attention(norm(x))      4 heads of 16, softmax(q k^T / 4) v
               x = x + mlp(norm(x))            fc 128 -> GELU [-> dropout] -> fc 64
    norm -> mean over the 16 tokens -> fc 10

5 norm slots (``block1_attn``, ``block1_mlp``, ``block2_attn``, ``block2_mlp``, ``final``),
71,946 parameters with layer norm in them. The attention is written out
(``torch.nn.functional.scaled_dot_product_attention``, no dropout, no mask): every token sees
every other. The linear layers are initialised Xavier uniform with zero biases, the position
embedding normal with deviation 0.02 (as ViT).

A ``seq`` norm sees each image as 16 tokens of 64 channels: per-token norms (``layernorm``,
``rmsnorm``, ``groupnorm``, ``dyt``) normalize each token over its channels, batch norms each
channel over the batch's N x 16 tokens. In a pre-norm block nothing but the norm sits between
the residual stream and the next layer, so ``--activation`` has no effect here (the MLP's is
GELU) and neither has ``--no-bias-before-norm`` (the layer before a slot is the residual
addition); ``--dropout`` goes after each MLP's GELU.

Defaults (:attr:`WORKLOAD` ``.defaults``, used where a run sets none): ``lr=0.1``, tuned once
for ``layernorm`` with plain SGD, batch 256 (docs/workloads.md has the measurements); the
other settings are the harness's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from normzoo.hookspecs import hookimpl
from normzoo.interface import Slot, WorkloadInfo
from normzoo.workloads.data import IMAGE_SIZE, load_fashion_mnist
from normzoo.workloads.slots import NormSlots

NAME = "transformer"
#: Patch side, token width, attention heads, MLP width, blocks.
PATCH, WIDTH, HEADS, MLP, DEPTH = 7, 64, 4, 128, 2
TOKENS = (IMAGE_SIZE[0] // PATCH) * (IMAGE_SIZE[1] // PATCH)
SLOTS = (
    *(
        Slot(f"block{block}_{part}", WIDTH, "seq", (TOKENS,))
        for block in range(1, DEPTH + 1)
        for part in ("attn", "mlp")
    ),
    Slot("final", WIDTH, "seq", (TOKENS,)),
)


def _norm(slots: NormSlots, name: str) -> nn.Module:
    """The norm of slot ``name`` (an identity where the placement puts none), without the
    activation that :meth:`NormSlots.block` appends: a pre-norm slot has no layer before it
    of its own (the residual stream) and no activation after it."""
    _stream, *norm, _activation = slots.block(name, nn.Identity())
    return nn.Sequential(*norm)


class Patches(nn.Module):
    """``(N, 1, 28, 28)`` images to ``(N, 16, 49)``: non-overlapping 7x7 patches in row-major
    order, each flattened row by row."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        grid = images.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH)
        return grid.permute(0, 2, 4, 1, 3, 5).reshape(n, TOKENS, c * PATCH * PATCH)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens, written out."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, width / heads)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(n, length, width))


class Block(nn.Module):
    """Pre-norm: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, slots: NormSlots, block: int) -> None:
        super().__init__()
        self.attn_norm = _norm(slots, f"block{block}_attn")
        self.attn = Attention(WIDTH, HEADS)
        self.mlp_norm = _norm(slots, f"block{block}_mlp")
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, MLP), nn.GELU(), *slots.dropout(), nn.Linear(MLP, WIDTH)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class VisionTransformer(nn.Module):
    """Patches, their embedding and positions, the blocks, the final norm, mean pooling and
    the head."""

    def __init__(self, slots: NormSlots) -> None:
        super().__init__()
        self.patches = Patches()
        self.embed = nn.Linear(PATCH * PATCH, WIDTH)
        self.position = nn.Parameter(torch.zeros(1, TOKENS, WIDTH))
        self.blocks = nn.Sequential(*(Block(slots, block) for block in range(1, DEPTH + 1)))
        self.norm = _norm(slots, "final")
        self.head = nn.Linear(WIDTH, 10)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.patches(images)) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def build(slots: NormSlots) -> VisionTransformer:
    """The vision transformer with the norms of ``slots``."""
    return VisionTransformer(slots)


WORKLOAD = WorkloadInfo(
    name=NAME,
    summary="vision transformer on Fashion-MNIST: 16 patches of 7x7, width 64, 2 pre-norm "
    "blocks of 4 heads, a norm before each attention, each MLP and the head",
    slots=SLOTS,
    factory=build,
    data=load_fashion_mnist,
    reference="Dosovitskiy et al., An Image Is Worth 16x16 Words, ICLR 2021 (ViT), pre-norm "
    "as in Xiong et al., On Layer Normalization in the Transformer Architecture, ICML 2020",
    # tuned once for layernorm on the validation split (docs/workloads.md)
    defaults={"lr": 0.1},
)


@hookimpl
def normzoo_register_workloads(register: Callable[[WorkloadInfo], None]) -> None:
    register(WORKLOAD)
