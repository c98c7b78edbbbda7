"""The training loop every caller shares: one process, a Ray Train worker, or a bare GPU box.

`fit` = build data + method + memory, fill the memory (one clean pass), train epochs
(reporting online kNN top-1 on the validation subset), recompute the memory with the
final weights, evaluate every test level. Distributed context is passed in.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from grafit_core.config import Config
from grafit_core.data import NONE_LEVEL, Collection
from grafit_core.data.transforms import build_transform
from grafit_core.data.views import EvalImages, TrainViews
from grafit_core.distributed import DistContext
from grafit_core.evaluate import check_against_data, evaluate, online_knn, validation_indices
from grafit_core.memory import MemoryBank
from grafit_core.methods import Method, get_method
from grafit_core.models import ema_tau


@dataclass
class FitResult:
    method: Optional[Method]
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)   # one dict per epoch
    skipped: Optional[str] = None                  # why nothing was trained (e.g. level `none`)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 0 (Goyal et al.; bag of tricks)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def build_optimizer(method: Method, cfg: Config) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on BN and biases."""
    params = [p for p in method.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    o = cfg.optim
    return torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=o.momentum, nesterov=o.nesterov)


@torch.no_grad()
def embed(method: Method, collection: Collection, cfg: Config, ctx: DistContext,
          transform) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """g_theta of every image (clean view), in collection order, and the head's logits if any."""
    was_training = method.training
    method.eval()
    loader = DataLoader(EvalImages(collection, transform), batch_size=cfg.eval.batch_size,
                        shuffle=False, num_workers=cfg.data.num_workers)
    zs, logits = [], []
    for x, _ in loader:
        z, lg = method.embed(x.to(ctx.device))
        zs.append(z.cpu())
        if lg is not None:
            logits.append(lg.cpu())
    method.train(was_training)
    return torch.cat(zs), (torch.cat(logits) if logits else None)


def train_one_epoch(method: Method, loader: DataLoader, optimizer, memory: MemoryBank, cfg: Config,
                    ctx: DistContext, step: int, total_steps: int, log: Callable = print) -> tuple[dict, int]:
    """One pass over the loader; the memory row of each sample is updated once per step."""
    method.train()
    warmup = int(cfg.optim.warmup_epochs * len(loader))
    sums: dict[str, float] = {}
    start, n = time.time(), 0
    for views, labels, indices in loader:
        lr = lr_at(step, total_steps, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views, labels, indices = views.to(ctx.device), labels.to(ctx.device), indices.to(ctx.device)
        loss, parts, z_mean = method.training_step(views, labels, indices, memory)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {parts}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(ema_tau(cfg.method.tau_base, step, total_steps, cfg.method.tau_schedule))
        memory.update(indices, z_mean)
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        step, n = step + 1, n + 1
    stats = {k: v / max(n, 1) for k, v in sums.items()}
    stats["lr"] = lr if n else 0.0
    stats["images_per_s"] = n * loader.batch_size * ctx.world_size / max(time.time() - start, 1e-9)
    return stats, step


def train_method(cfg: Config, train: Collection, labels: np.ndarray, ctx: DistContext,
                 on_epoch: Optional[Callable] = None, log: Callable = print,
                 test_levels: Optional[list[str]] = None, method_name: Optional[str] = None):
    """Train one method on `labels` (the training-level labels, or pseudo-labels). Returns
    (method, memory, history). Only `labels` reaches the training step."""
    method_cls = get_method(method_name or cfg.method.name)
    num_classes = int(labels.max()) + 1
    channels = train.image(0).shape[0]
    torch.manual_seed(cfg.seed)                                # identical init on every rank
    method = method_cls(cfg, channels, num_classes).to(ctx.device)
    train_tf = build_transform(cfg.data.augment, cfg.data.image_size, channels, train=True)
    eval_tf = build_transform(cfg.data.augment, cfg.data.image_size, channels, train=False)

    dataset = TrainViews(train, labels, train_tf, cfg.data.num_views)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=cfg.seed)
    per_rank = cfg.optim.batch_size // ctx.world_size
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))
    if len(loader) == 0:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is larger than the training set ({len(train)})")
    optimizer = build_optimizer(method, cfg)
    total_steps = cfg.optim.epochs * len(loader)

    # ====== the memory starts from real embeddings (one clean pass), not random ======
    memory = MemoryBank(torch.as_tensor(labels), method.net.embed_dim,
                        renormalize=cfg.method.memory_renormalize, device=ctx.device)
    z0, _ = embed(method, train, cfg, ctx, eval_tf)
    memory.fill(torch.arange(len(train)), z0)

    levels = test_levels or []
    level_labels = {lv: torch.as_tensor(train.labels_at(lv)) for lv in levels}
    val_idx = validation_indices(len(train), cfg.eval.val_size)
    torch.manual_seed(cfg.seed + 1000 * ctx.rank)               # augmentation stream per rank
    history, step = [], 0
    for epoch in range(cfg.optim.epochs):
        sampler.set_epoch(epoch)
        start = time.time()
        stats, step = train_one_epoch(method, loader, optimizer, memory, cfg, ctx, step, total_steps, log)
        stats.update(online_knn(memory.bank, level_labels, val_idx, cfg))
        stats.update(epoch=epoch + 1, epoch_time_s=time.time() - start)
        history.append(stats)
        if ctx.is_main:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch")
            log(f"[{method_cls.__name__} {cfg.data.train_level}] epoch {epoch + 1}/{cfg.optim.epochs}: {shown}")
        if on_epoch is not None:
            on_epoch(epoch + 1, stats)
    return method, eval_tf, history


def fit(cfg: Config, train: Collection, query: Collection, ctx: DistContext = DistContext(),
        on_epoch: Optional[Callable] = None, log: Callable = print) -> FitResult:
    """Train cfg.method at cfg.data.train_level and evaluate at every test level."""
    level = cfg.data.train_level
    test_levels = check_against_data(cfg, train)
    method_cls = get_method(cfg.method.name)
    if level == NONE_LEVEL and not method_cls.label_free(cfg):
        note = f"{cfg.method.name} has no label-free loss: nothing to learn at level 'none'"
        log(f"skipped: {note}")
        return FitResult(None, skipped=note)
    labels = torch.as_tensor(train.labels_at(level))

    def train_stage(name, stage_labels):
        m, tf, _ = train_method(cfg, train, stage_labels.numpy(), ctx, log=log, method_name=name)
        return embed(m, train, cfg, ctx, tf)[0]

    labels = method_cls.prepare_labels(cfg, labels, train_stage)
    method, eval_tf, history = train_method(cfg, train, labels.numpy(), ctx, on_epoch, log, test_levels)

    # ====== test time: only f and P remain; m_i = g(x_i) recomputed with the final weights ======
    bank, _ = embed(method, train, cfg, ctx, eval_tf)
    queries, query_logits = embed(method, query, cfg, ctx, eval_tf)
    metrics = evaluate(cfg, bank, train, queries, query, test_levels, query_logits)
    return FitResult(method, metrics, history)
