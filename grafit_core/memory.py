"""The memory M of embeddings of the training set (paper §3.1, "Memory of embeddings").

`MemoryBank` holds the rows [offset, offset + size) of the N x d memory with their
training-level labels; a single process holds all rows (offset 0). A sharded memory
(one contiguous block per worker) implements the same interface with its own block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from grafit_core.losses import knn_loss


class MemoryBank:
    def __init__(self, labels: torch.Tensor, dim: int, *, offset: int = 0, renormalize: bool = True,
                 device: torch.device | str = "cpu"):
        self.labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        self.offset = offset
        self.renormalize = renormalize
        self.bank = torch.zeros(len(self.labels), dim, device=device)
        self.filled = torch.zeros(len(self.labels), dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def _local(self, indices: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of this block among `indices`, each once (a padded sampler may repeat an index)."""
        local = indices.to(self.bank.device) - self.offset
        mine = (local >= 0) & (local < len(self))
        local, z = local[mine], z.detach().to(self.bank)[mine]
        uniq, inverse = torch.unique(local, return_inverse=True)
        first = torch.full_like(uniq, len(local)).scatter_reduce(
            0, inverse, torch.arange(len(local), device=local.device), reduce="amin")
        return uniq, z[first]

    @torch.no_grad()
    def fill(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """Write rows as they are (the initial pass over the training set, and the final recompute)."""
        rows, z = self._local(indices, z)
        self.bank[rows] = z
        self.filled[rows] = True

    @torch.no_grad()
    def update(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """m_i <- normalize((m_i + z_i) / 2) (SNCA); with renormalize=False the paper's literal (m_i + z_i) / 2."""
        rows, z = self._local(indices, z)
        new = (self.bank[rows] + z) / 2
        self.bank[rows] = F.normalize(new, dim=1) if self.renormalize else new

    def is_full(self) -> bool:
        return bool(self.filled.all())

    def state_dict(self) -> dict:
        return {"bank": self.bank.cpu(), "labels": self.labels.cpu(), "offset": self.offset,
                "filled": self.filled.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.bank.copy_(state["bank"])
        self.filled.copy_(state["filled"])

    def knn_loss(self, z: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, sigma: float) -> torch.Tensor:
        """L_knn of the queries against this (whole, single-process) memory."""
        return knn_loss(z, labels, indices, self.bank, self.labels, sigma)
