"""Collectives for training across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the autograd graph (so the in-batch
    negatives of the ICT loss span the global batch and their gradients reach every process).

    Every process then computes the same global loss; the backward of the gather sums the gradients of all
    copies, which DDP's averaging turns back into exactly the single-process gradient of the global batch
    (tested with two gloo processes in tests/test_distributed.py). Without an initialised process group it
    returns ``x`` unchanged.

    Example:
        >>> gather_with_grad(torch.ones(2, 3)).shape  # one process
        torch.Size([2, 3])
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gradient of the gathered tensor over processes (every process
    computes the same global loss) and keeps this process's rows.

    Written out rather than taken from ``torch.distributed.nn`` (deprecated there), and using only
    all_gather / all_reduce, which every backend (gloo included) supports with equal-sized inputs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
