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
            dist.all_reduce(t)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized tensors from every rank along dim 0 (no gradient)."""
        if not self.distributed:
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)
