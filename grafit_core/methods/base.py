"""The shared method: any weighted sum of L_knn, L_inst and L_ce on top of GrafitNet.

A method module subclasses `Method` and sets its `defaults` (loss weights, projector);
every row of the paper's Table 5 is a configuration of this class.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from grafit_core.losses import ce_loss, instance_loss
from grafit_core.models import GrafitNet, TargetNet, build_trunk


class Method(nn.Module):
    defaults = {"w_knn": 1.0, "w_inst": 1.0, "w_ce": 0.0, "projector": "mlp"}
    head_gives_coarse = False   # True when the softmax head predicts the training-level classes

    def __init__(self, cfg, in_channels: int, num_classes: int):
        super().__init__()
        m = cfg.method
        self.w_knn, self.w_inst, self.w_ce = (self.resolve(cfg, k) for k in ("w_knn", "w_inst", "w_ce"))
        self.projector_kind = self.resolve(cfg, "projector")
        self.sigma = m.sigma
        self.label_smoothing = m.label_smoothing
        self.bf16 = cfg.optim.precision == "bf16"
        trunk, feat_dim = build_trunk(cfg.model.trunk, in_channels, cfg.model.small_stem, cfg.model.width)
        self.net = GrafitNet(trunk, feat_dim, self.projector_kind, cfg.model.embed_dim, cfg.model.hidden_dim,
                             predictor=self.w_inst > 0, num_classes=num_classes if self.w_ce > 0 else 0)
        self.target = TargetNet(self.net) if self.w_inst > 0 else None
        self._ddp = None

    def set_ddp(self, ddp: nn.Module) -> None:
        """Run training forwards through a DistributedDataParallel wrapper of self.net
        (kept out of the module tree so state_dict keys stay those of a single process)."""
        object.__setattr__(self, "_ddp", ddp)

    @classmethod
    def resolve(cls, cfg, key: str):
        section = cfg.model if key == "projector" else cfg.method
        value = getattr(section, key)
        return cls.defaults[key] if value is None else value

    @classmethod
    def label_free(cls, cfg) -> bool:
        """Whether the method learns anything without labels (level `none`)."""
        return cls.resolve(cfg, "w_inst") > 0

    @classmethod
    def prepare_labels(cls, cfg, labels: torch.Tensor, train_stage) -> torch.Tensor:
        """Labels the method trains on (ClusterFit+ replaces them with pseudo-labels): all N of them, on
        every rank. `train_stage(name, labels)` trains method `name` on `labels` and returns
        (features, n, ctx): this rank's shard_bounds(n, ctx.world_size, ctx.rank) block of the n training
        images' embeddings, n, and the DistContext (every rank calls it; collectives go through ctx)."""
        return labels

    def training_step(self, views: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, memory):
        """views: B x T x C x H x W. Returns (loss, {name: value}, normalised mean embedding per sample).
        optim.precision bf16: the networks run under autocast, the losses (the kNN loss's
        log-sum-exps included) on their outputs cast back to fp32."""
        B, T = views.shape[:2]
        with torch.autocast(views.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = (self._ddp if self._ddp is not None else self.net)(views.flatten(0, 1))
            target = self.target(views.flatten(0, 1)) if self.w_inst > 0 else None
        out = {k: v.float() for k, v in out.items()}
        z = out["z"].view(B, T, -1)
        parts = {}
        if self.w_knn > 0:   # L_knn on each of the T views, averaged
            parts["knn"] = sum(memory.knn_loss(z[:, t], labels, indices, self.sigma) for t in range(T)) / T
        if self.w_inst > 0:
            preds, targets = out["pred"].view(B, T, -1), target.float().view(B, T, -1)
            parts["inst"] = instance_loss([preds[:, t] for t in range(T)], [targets[:, t] for t in range(T)])
        if self.w_ce > 0:
            parts["ce"] = ce_loss(out["logits"], labels.repeat_interleave(T), self.label_smoothing)
        weights = {"knn": self.w_knn, "inst": self.w_inst, "ce": self.w_ce}
        loss = sum(weights[k] * v for k, v in parts.items())
        return loss, {k: float(v.detach()) for k, v in parts.items()}, F.normalize(z.detach().mean(1), dim=1)

    @torch.no_grad()
    def after_step(self, tau: float) -> None:
        if self.target is not None:
            self.target.update(self.net, tau)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g_theta(x) and, when the head predicts the training level, its logits."""
        h = self.net.trunk(x)
        z = F.normalize(self.net.projector(h), dim=1)
        logits = self.net.classifier(h) if self.head_gives_coarse and self.net.classifier is not None else None
        return z, logits
