"""Fine-tuning (paper §4.6, Tables 6-8): the trunk of a checkpoint of any method (or a randomly
initialised trunk, the reference) gets a new head, FC or MLP (two linear layers with BatchNorm
and ReLU between), and trunk + head are trained with the target task's labels: SGD, cosine
schedule from lr 0.01 by default. Projector, predictor and instance branch are dropped.
Reports top-1 and top-5 on the target's test split. Distributed like `fit` (DDP, a seeded
DistributedSampler per rank; each rank scores its share of the test split, counts are summed).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from grafit_core import checkpoint
from grafit_core.config import Config, flatten_dict, to_dict, with_overrides
from grafit_core.data import Collection
from grafit_core.data.pipeline import pipeline_of
from grafit_core.data.transforms import build_transform
from grafit_core.data.views import EvalImages, TrainViews
from grafit_core.distributed import DistContext
from grafit_core.engine import build_loader, lr_at, reduce_mean, set_epoch
from grafit_core.errors import ConfigError
from grafit_core.memory import shard_bounds
from grafit_core.models import build_trunk, mlp


STATE = "finetune_state.pt"


class FinetuneNet(nn.Module):
    """trunk f -> head (FC or MLP) -> class logits."""

    def __init__(self, trunk: nn.Module, feat_dim: int, num_classes: int, head: str, hidden_dim: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(feat_dim, num_classes) if head == "fc" else mlp(feat_dim, hidden_dim, num_classes)

    def forward(self, x):
        return self.head(self.trunk(x))


def feature_dim(trunk: nn.Module, image: torch.Tensor) -> int:
    was = trunk.training
    trunk.eval()
    with torch.no_grad():
        dim = trunk(image[None]).shape[1]
    trunk.train(was)
    return dim


def load_trunk(cfg: Config, train: Collection) -> nn.Module:
    """The pre-trained trunk of finetune.checkpoint, or a fresh one of model.trunk (seeded)."""
    ft = cfg.finetune
    if ft.checkpoint is None:
        torch.manual_seed(cfg.seed)
        return build_trunk(cfg.model.trunk, train.image(0).shape[0], cfg.model.small_stem, cfg.model.width)[0]
    try:
        pre_cfg, method, meta = checkpoint.load_trained(ft.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{cfg.source or '<config>'}: finetune.checkpoint: {err}") from None
    check_pipeline(cfg, meta["pipeline"], train)
    return method.net.trunk


def check_pipeline(cfg: Config, trained, train: Collection) -> None:
    """The target images must be decoded as the trunk's training images were (channels, inversion);
    the fine-tuning's own preset and size may differ: it trains."""
    target = pipeline_of(cfg, train)
    if (target.channels, target.invert) != (trained.channels, trained.invert):
        raise ConfigError(f"{cfg.source or '<config>'}: finetune.checkpoint: the trunk was trained on images read as "
                          f"{trained.describe()}; {cfg.data.name} reads the target images as {target.describe()} "
                          f"(data.options.invert / the dataset's channels must match)")


def build_net(cfg: Config, train: Collection, num_classes: int) -> FinetuneNet:
    """Trunk (pre-trained or not), then the head initialised from the seed: the same call in a
    test rebuilds the same model by hand."""
    image = train.image(0)
    trunk = load_trunk(cfg, train)
    tf = build_transform(cfg.data.augment, cfg.data.image_size, image.shape[0], train=False)
    dim = feature_dim(trunk, tf(image))
    torch.manual_seed(cfg.seed + 1)
    return FinetuneNet(trunk, dim, num_classes, cfg.finetune.head, cfg.finetune.hidden_dim)


def _as_optim(cfg: Config) -> Config:
    """The finetune section seen through the optimiser/loader fields the engine helpers read."""
    ft = cfg.finetune
    return with_overrides(cfg, {"optim.epochs": ft.epochs, "optim.batch_size": ft.batch_size,
                                "optim.base_lr": ft.base_lr * 256 / ft.batch_size,   # lr = ft.base_lr
                                "optim.weight_decay": ft.weight_decay, "optim.momentum": ft.momentum,
                                "optim.warmup_epochs": ft.warmup_epochs})


@dataclass
class FinetuneResult:
    net: Optional[FinetuneNet]
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


@torch.no_grad()
def accuracy(net: nn.Module, test: Collection, labels: torch.Tensor, cfg: Config, ctx: DistContext) -> dict:
    """Top-1 and top-5 over the whole test split: each rank scores its contiguous share."""
    net.eval()
    lo, hi = shard_bounds(len(test), ctx.world_size, ctx.rank)
    tf = build_transform(cfg.data.augment, cfg.data.image_size, test.image(0).shape[0], train=False)
    loader = DataLoader(Subset(EvalImages(test, tf), range(lo, hi)), batch_size=cfg.eval.batch_size)
    counts = torch.zeros(3, dtype=torch.float64)
    for x, idx in loader:
        logits = net(x.to(ctx.device)).float().cpu()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        y = labels[idx]
        counts += torch.tensor([float((top[:, 0] == y).sum()), float((top == y[:, None]).any(1).sum()), len(y)],
                               dtype=torch.float64)
    counts = ctx.all_reduce_sum(counts.to(ctx.device)).cpu()
    net.train()
    return {"top1": float(counts[0] / counts[2]), "top5": float(counts[1] / counts[2])}


def finetune(cfg: Config, train: Collection, test: Collection, ctx: DistContext = DistContext(),
             on_epoch: Optional[Callable] = None, log: Callable = print,
             resume_from: Optional[str] = None, on_step: Optional[Callable] = None) -> FinetuneResult:
    """Fine-tune on train's labels at finetune.level (default: the finest level), test on `test`.
    on_epoch(epoch, stats, save): save(directory) writes the state (rank 0: net, optimizer, epoch,
    history); resume_from continues from such a directory; on_step(epoch, step_in_epoch) as in fit."""
    level = cfg.finetune.level or train.hierarchy.levels[-1]
    ocfg = _as_optim(cfg)
    labels = torch.as_tensor(train.labels_at(level))
    net = build_net(cfg, train, train.num_classes(level)).to(ctx.device)
    model = DistributedDataParallel(net, device_ids=None if ctx.device.type == "cpu" else [ctx.device]) \
        if ctx.distributed else net
    channels = train.image(0).shape[0]
    tf = build_transform(cfg.data.augment, cfg.data.image_size, channels, train=True)
    loader = build_loader(TrainViews(train, labels.numpy(), tf, 1, cfg.seed), ocfg, ctx)
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": ocfg.optim.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=ocfg.lr, momentum=ocfg.optim.momentum)
    total, warmup = cfg.finetune.epochs * len(loader), int(cfg.finetune.warmup_epochs * len(loader))
    step, history, first_epoch = 0, [], 0
    if resume_from:
        state = torch.load(os.path.join(resume_from, STATE), map_location="cpu", weights_only=True)
        if "config" in state:
            check_same_finetune(state["config"], cfg, resume_from)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        first_epoch, step, history = state["epoch"], state["step"], state["history"]
    test_labels = torch.as_tensor(test.labels_at(level))
    for epoch in range(first_epoch, cfg.finetune.epochs):
        set_epoch(loader, epoch)
        start, losses = time.time(), []
        net.train()
        for i, (views, y, _) in enumerate(loader):
            if on_step is not None:
                on_step(epoch + 1, i)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, ocfg.lr)
            loss = F.cross_entropy(model(views[:, 0].to(ctx.device)), y.to(ctx.device))
            bad = ctx.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
            if bad.item() > 0:
                raise FloatingPointError(f"non-finite fine-tuning loss at epoch {epoch + 1}: lower finetune.base_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        stats = reduce_mean({"loss": sum(losses) / len(losses), "first_step_loss": losses[0]}, ctx)
        ctx.share_buffers(net)                                  # rank 0's BatchNorm statistics: the checkpoint's
        stats.update({f"finetune_{k}/{level}": v for k, v in accuracy(net, test, test_labels, cfg, ctx).items()})
        stats.update(epoch=epoch + 1, epoch_time_s=time.time() - start)
        history.append(stats)
        if ctx.is_main:
            log(f"[finetune {cfg.finetune.head} {level}] epoch {epoch + 1}/{cfg.finetune.epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
        if on_epoch is not None:
            def save(directory, _epoch=epoch + 1, _step=step):
                os.makedirs(directory, exist_ok=True)
                if ctx.is_main:
                    checkpoint.atomic_save({"net": net.state_dict(), "optimizer": opt.state_dict(), "epoch": _epoch,
                                            "step": _step, "history": history, "config": to_dict(cfg)},
                                           os.path.join(directory, STATE))
            on_epoch(epoch + 1, stats, save)
    final = {k: v for k, v in history[-1].items() if k.startswith("finetune_")}
    return FinetuneResult(net, final, history)


def check_same_finetune(saved: dict, cfg: Config, where: str) -> None:
    """A fine-tuning checkpoint resumes only the same fine-tuning (more epochs allowed)."""
    def fields(d):
        flat = flatten_dict(d)
        return {k: v for k, v in flat.items() if (k.startswith("finetune.") and k != "finetune.epochs")
                or k == "seed" or k in ("data.name", "data.augment", "data.image_size")
                or k.startswith("data.options.") and k != "data.options.cache_size"}
    a, b = fields(saved), fields(to_dict(cfg))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        raise ConfigError(f"{where}: the fine-tuning checkpoint was written by another config ("
                          + "; ".join(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now" for k in diff[:5])
                          + "); use another run name")


def check_finetune(cfg: Config, train: Collection) -> str:
    """Checks that need the data: the level exists, the batch fits. Returns the level."""
    src = cfg.source or "<config>"
    level = cfg.finetune.level or train.hierarchy.levels[-1]
    if level not in train.hierarchy.levels:
        raise ConfigError(f"{src}: finetune.level: {level!r} is not a level of {cfg.data.name} "
                          f"({', '.join(train.hierarchy.levels)})")
    if cfg.finetune.batch_size > len(train):
        raise ConfigError(f"{src}: finetune.batch_size: {cfg.finetune.batch_size} is larger than the training "
                          f"split ({len(train)} images)")
    if cfg.finetune.checkpoint is not None and not os.path.exists(os.path.join(cfg.finetune.checkpoint,
                                                                               "train_state.pt")):
        raise ConfigError(f"{src}: finetune.checkpoint: {cfg.finetune.checkpoint} holds no train_state.pt")
    if cfg.finetune.checkpoint is not None:
        load_trunk(cfg, train)                # the trunk's input pipeline against the target images
    return level

