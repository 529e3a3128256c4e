"""What each process of the distributed tests runs (a module, so that spawned processes can
import it): the norms in train mode on this process's share of a fixed global batch."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist

import normzoo

CHANNELS = {"fc": 6, "conv": 3}
SHAPES = {"fc": (6,), "conv": (3, 4, 4)}
NORMS = ("batchnorm", "zca", "iternorm", "pit")
OPTIONS = {"zca": {"group_size": 4}, "iternorm": {"group_size": 4}}


def global_batch(layout: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed float64 batch and the upstream gradient for it (the loss is ``sum(y * g)``)."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(size, *SHAPES[layout], generator=generator, dtype=torch.float64)
    x = x * torch.linspace(0.5, 2.0, CHANNELS[layout]).reshape(1, -1, *[1] * (x.dim() - 2))
    return x.exp() if layout == "conv" else x, torch.randn(x.shape, generator=generator,
                                                             dtype=torch.float64)  # fmt: skip


def build(norm: str, layout: str, **options: object) -> torch.nn.Module:
    torch.manual_seed(3)
    options = {**OPTIONS.get(norm, {}), **options}
    module = normzoo.build(norm, CHANNELS[layout], layout, **options).double()
    with torch.no_grad():
        for parameter in module.parameters():  # not 1 and 0: the affine's gradient matters
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return module


def train_step(
    norm: str, layout: str, split: list[int], rank: int, steps: int = 2, **options: object
) -> dict:
    """Two training steps of one norm on this rank's share; the parameter gradients are
    summed over the processes (the global loss is the sum of the ranks' losses)."""
    x_all, g_all = global_batch(layout, sum(split))
    start = sum(split[:rank])
    module = build(norm, layout, **options)
    result: dict[str, torch.Tensor] = {}
    for step in range(steps):
        x = x_all[start : start + split[rank]].clone().requires_grad_(True)
        y = module(x * (1 + step))
        (y * g_all[start : start + split[rank]]).sum().backward()
        result[f"y{step}"], result[f"grad_x{step}"] = y.detach(), x.grad
    if dist.is_initialized():
        for parameter in module.parameters():
            dist.all_reduce(parameter.grad)
    for name, parameter in module.named_parameters():
        result[f"grad_{name}"] = parameter.grad
    for name, buffer in module.state_dict().items():
        result[name] = buffer
    return result


def worker(rank: int, world: int, store: str, out: str, splits: list[list[int]]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for split in splits:
        for norm in NORMS:
            for layout in CHANNELS:
                results[(norm, layout, tuple(split))] = train_step(norm, layout, split, rank)
    results["unsynced"] = train_step("batchnorm", "fc", [3, 13], rank, sync=False)
    # eval mode must not communicate: count the collectives while rank 0 runs eval alone
    calls = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}
    for name, original in originals.items():
        setattr(
            dist, name, lambda *a, _n=name, _o=original, **k: (calls.append(_n), _o(*a, **k))[1]
        )
    if rank == 0:
        for norm in NORMS:
            for layout in CHANNELS:
                module = build(norm, layout).eval()
                module(global_batch(layout, 5)[0])
    for name, original in originals.items():
        setattr(dist, name, original)
    results["eval_collectives"] = len(calls)
    dist.barrier()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()
