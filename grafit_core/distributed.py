"""The distributed context, passed in explicitly (never read from globals).

A single process is `DistContext()`. A Ray Train worker builds one from its rank and world
size; collectives are only called when world_size > 1, so grafit_core runs without
torch.distributed being initialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None          # process group for the memory's collectives (None: default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (no gradient); identity in a single process."""
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, group=self.group)
        return t

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Every rank takes rank 0's buffers (BatchNorm statistics) before an evaluation: without
        SyncBatchNorm each rank's follow its own batches (DDP copies rank 0's only at the next
        training forward), so each shard would be embedded by a slightly different model, none of
        them the one the checkpoint holds (rank 0's)."""
        if self.distributed:
            for buf in module.buffers():
                dist.broadcast(buf, src=0, group=self.group)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized tensors from every rank along dim 0 (no gradient)."""
        if not self.distributed:
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.cat(out)


class _AllGatherGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    A plain all_gather cuts the graph: the loss other ranks compute from this rank's
    tensor would then send it no gradient (silently wrong).
    """

    @staticmethod
    def forward(ctx, t, world_size, rank, group):
        ctx.rank, ctx.group, ctx.n = rank, group, t.shape[0]
        out = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(out, t.contiguous(), group=group)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None, None


def all_gather_grad(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Autograd-aware concatenation of equal-sized tensors from every rank along dim 0."""
    if not ctx.distributed:
        return t
    return _AllGatherGrad.apply(t, ctx.world_size, ctx.rank, ctx.group)
