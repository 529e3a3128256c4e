"""Differentiable reductions over the processes of ``torch.distributed``.

A norm with batch statistics computes them over the *global* batch (every process's share)
when torch.distributed runs more than one process: each process reduces what its statistics
need (counts, sums, sums of squares or of outer products; or the values themselves), and the
gradient flows back across processes exactly, because the backward of each reduction is a
reduction too. With ``y = sum_r x_r`` on every process and the loss ``L = sum_r L_r(y)``,
``dL/dx_r = sum_r' dL_r'/dy``: the backward of a sum over processes is again a sum over
processes. All reductions use ``SUM`` (gloo's ``AVG`` is unreliable); callers divide.

Nothing here communicates unless :func:`active` is true, so a single process pays nothing.
Every process must make the same calls in the same order (they are collectives); the norms
call them only in ``train()`` mode, never in ``eval()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active(enabled: bool = True) -> bool:
    """True when ``enabled`` and torch.distributed is initialised with more than one process."""
    return enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.detach().clone().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.clone().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``sum`` of ``tensor`` over all processes, on every process; differentiable."""
    return _AllReduceSum.apply(tensor)


def sum_over_processes(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``tensors`` summed over all processes, in one collective (they are packed into
    one float64 vector and unpacked again, each in its own shape and dtype); differentiable."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    total = all_reduce_sum(flat)
    out, start = [], 0
    for t in tensors:
        out.append(total[start : start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return tuple(out)


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, columns: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        size = torch.tensor([columns.shape[1]], dtype=torch.long, device=columns.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        widths = [int(s) for s in sizes]
        padded = columns.new_zeros(columns.shape[0], max(widths))
        padded[:, : columns.shape[1]] = columns
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.widths, ctx.rank = widths, dist.get_rank()
        return torch.cat([part[:, :w] for part, w in zip(parts, widths, strict=True)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.clone().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = sum(ctx.widths[: ctx.rank])
        return total[:, start : start + ctx.widths[ctx.rank]]


def gather_columns(columns: torch.Tensor) -> torch.Tensor:
    """The ``(C, m_r)`` matrices of all processes side by side, ``(C, sum_r m_r)``, in rank
    order, on every process; the widths may differ (each is padded to the largest for the
    collective and trimmed after). Differentiable."""
    return _GatherColumns.apply(columns)
