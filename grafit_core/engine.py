"""The training loop every caller shares: one process, a Ray Train worker, or a bare GPU box.

`fit` = build data + method + memory, fill the memory (one clean pass), train epochs
(reporting online kNN top-1 on the validation subset), recompute the memory with the
final weights, evaluate every test level. Distributed context is passed in.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from grafit_core import checkpoint
from grafit_core.config import Config, check_resumable, config_fingerprint, to_dict, with_overrides
from grafit_core.data import NONE_LEVEL, Collection
from grafit_core.data.pipeline import pipeline_of
from grafit_core.data.transforms import build_transform
from grafit_core.data.views import EvalImages, GlobalBatches, TrainViews
from grafit_core.distributed import DistContext
from grafit_core.evaluate import check_against_data, evaluate, evaluate_unseen, online_knn, validation_indices
from grafit_core.memory import MemoryBank, ShardedMemoryBank, gather_rows, shard_bounds
from grafit_core.methods import Method, get_method
from grafit_core.models import ema_tau


DTYPES = {"fp32": None, "bf16": torch.bfloat16}   # method.memory_dtype; None: torch's default (fp32)


@dataclass
class FitResult:
    method: Optional[Method]
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)   # one dict per epoch
    skipped: Optional[str] = None                  # why nothing was trained (e.g. level `none`)
    embeddings: Optional[torch.Tensor] = None      # final g(x) of this rank's collection rows
    offset: int = 0                                # global index of embeddings[0]


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
def embed(method: Method, collection: Collection, cfg: Config, ctx: DistContext, transform,
          rows: Optional[range] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """g_theta of the images `rows` (default: all) with the clean view, in order, and the
    head's logits if the method has a head for the training level."""
    was_training = method.training
    method.eval()
    dataset = EvalImages(collection, transform)
    if rows is not None:
        dataset = Subset(dataset, rows)
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    zs, logits = [], []
    for x, _ in loader:
        z, lg = method.embed(x.to(ctx.device))
        zs.append(z.cpu())
        if lg is not None:
            logits.append(lg.cpu())
    method.train(was_training)
    head = method.net.classifier if method.head_gives_coarse else None
    if not logits and head is not None:      # an empty shard still takes part in gathering the logits
        logits = [torch.zeros(0, head.out_features)]
    return (torch.cat(zs) if zs else torch.zeros(0, method.net.embed_dim)), (torch.cat(logits) if logits else None)


def embed_sharded(method, collection, cfg, ctx, transform):
    """Each rank embeds its own block of the collection (no rank embeds everything)."""
    start, stop = shard_bounds(len(collection), ctx.world_size, ctx.rank)
    return embed(method, collection, cfg, ctx, transform, range(start, stop))


def reduce_mean(stats: dict, ctx: DistContext) -> dict:
    """Average per-rank numbers over ranks (the sharded knn term averages to the global loss)."""
    if not ctx.distributed:
        return stats
    keys = sorted(stats)
    t = ctx.all_reduce_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=ctx.device))
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.cpu())}


def train_one_epoch(method: Method, loader: DataLoader, optimizer, memory: MemoryBank, cfg: Config,
                    ctx: DistContext, step: int, total_steps: int, on_step: Optional[Callable] = None,
                    epoch: int = 0, sums: Optional[dict] = None, on_partial: Optional[Callable] = None
                    ) -> tuple[dict, int]:
    """One pass over the loader's global batches, from the sampler's `start` (a run resumed inside
    the epoch brings the loss sums of the batches before it); the memory row of each sample is
    updated once per step. on_step(epoch, batch) is called before each step (progress, fault
    injection); on_partial(batches_done, step, sums, due) after every step but the epoch's last, due
    every cfg.checkpoint.every_steps batches (the hook may checkpoint at other steps too: a
    preemption notice)."""
    method.train()
    sampler: GlobalBatches = loader.batch_sampler
    warmup = int(cfg.optim.warmup_epochs * sampler.num_batches)
    sums, every = dict(sums or {}), cfg.checkpoint.every_steps
    start, lr, tau = time.time(), 0.0, cfg.method.tau_base
    for b, (views, labels, indices) in enumerate(loader, start=sampler.start):
        if on_step is not None:
            on_step(epoch + 1, b)
        lr = lr_at(step, total_steps, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views, labels, indices = views.to(ctx.device), labels.to(ctx.device), indices.to(ctx.device)
        loss, parts, z_mean = method.training_step(views, labels, indices, memory)
        # every rank learns that some rank's loss is not finite (an all-reduced flag), so all stop
        # at the same step with the same message instead of one raising and the others hanging
        bad = ctx.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
        if bad.item() > 0:
            good = f"epoch {epoch}" + (f" + {b // every * every} batches" if every and b >= every else "")
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch + 1}, step {b + 1} of the epoch, on {int(bad.item())} of "
                f"{ctx.world_size} worker(s); training stopped, the checkpoint of {good} is the last good "
                f"one: lower optim.base_lr or raise method.sigma, then resume from it (this worker's losses: "
                f"{', '.join(f'{k}={v:.4g}' for k, v in parts.items())})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tau = ema_tau(cfg.method.tau_base, step, total_steps, cfg.method.tau_schedule)
        method.after_step(tau)
        memory.update(indices, z_mean)
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        step += 1
        if on_partial is not None and b + 1 < sampler.num_batches:
            on_partial(b + 1, step, sums, bool(every) and (b + 1) % every == 0)
    trained = len(sampler)                    # the batches this call trained (after a resume: the rest)
    stats = reduce_mean({k: v / sampler.num_batches for k, v in sums.items()}, ctx)
    stats.update(lr=lr, tau=tau, images_per_s=trained * cfg.optim.batch_size / max(time.time() - start, 1e-9))
    return stats, step


def gather_sums(sums: dict, ctx: DistContext) -> list[dict]:
    """Every rank's loss sums (float64: the Python floats exactly), for a checkpoint inside an epoch."""
    keys = sorted(sums)
    mine = torch.tensor([[sums[k] for k in keys]], dtype=torch.float64, device=ctx.device)
    return [dict(zip(keys, row.tolist())) for row in ctx.all_gather_cat(mine).cpu()]


def resumed_sums(by_rank: list[dict], ctx: DistContext) -> dict:
    """This rank's sums at the same world size; at another, the mean over the old ranks (what the
    epoch's reported means are made of)."""
    if len(by_rank) == ctx.world_size:
        return by_rank[ctx.rank]
    return {k: sum(r[k] for r in by_rank) / len(by_rank) for k in by_rank[0]}


def build_loader(dataset: TrainViews, cfg: Config, ctx: DistContext) -> DataLoader:
    """Each rank loads its share of each global batch (GlobalBatches: the order does not depend on
    the world size; the tail that does not fill a global batch is dropped)."""
    if len(dataset) < cfg.optim.batch_size:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is larger than the training set ({len(dataset)})")
    sampler = GlobalBatches(len(dataset), cfg.optim.batch_size, ctx.world_size, ctx.rank, cfg.seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers)


def set_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """The epoch's order and augmentations; start: its global batches already trained (a resume)."""
    loader.batch_sampler.set_epoch(epoch, start)
    loader.dataset.set_epoch(epoch)


def train_method(cfg: Config, train: Collection, labels: np.ndarray, ctx: DistContext,
                 on_epoch: Optional[Callable] = None, log: Callable = print,
                 test_levels: Optional[list[str]] = None, method_name: Optional[str] = None,
                 resume_from: Optional[str] = None, on_step: Optional[Callable] = None,
                 on_partial: Optional[Callable] = None):
    """Train one method on `labels` (training-level labels or pseudo-labels): only they reach a step.

    on_epoch(epoch, stats, save) is called on every rank after each epoch; save(directory)
    writes this rank's checkpoint files; on_partial(epoch, batches_done, due, save) after every
    step inside an epoch, due every cfg.checkpoint.every_steps global batches (every rank calls it
    and must agree whether to save: save gathers the ranks' loss sums). resume_from: a checkpoint
    directory to continue from (at an epoch's end or inside an epoch). Returns (method, eval
    transform, history, memory).
    """
    method_cls = get_method(method_name or cfg.method.name)
    channels = train.image(0).shape[0]
    torch.manual_seed(cfg.seed)                                # identical init on every rank
    method = method_cls(cfg, channels, int(labels.max()) + 1).to(ctx.device)
    if ctx.distributed:
        if cfg.model.sync_bn:
            if ctx.device.type != "cuda":        # PyTorch's SyncBatchNorm refuses CPU tensors
                raise ValueError("model.sync_bn needs GPU workers (--gpus-per-worker); BatchNorm "
                                 "statistics stay per worker on CPU, as in standard DDP")
            method.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.net)
        method.set_ddp(DistributedDataParallel(method.net, device_ids=None if ctx.device.type == "cpu"
                                               else [ctx.device]))
    train_tf = build_transform(cfg.data.augment, cfg.data.image_size, channels, train=True)
    eval_tf = build_transform(cfg.data.augment, cfg.data.image_size, channels, train=False)
    loader = build_loader(TrainViews(train, labels, train_tf, cfg.data.num_views, cfg.seed), cfg, ctx)
    optimizer = build_optimizer(method, cfg)
    total_steps = cfg.optim.epochs * loader.batch_sampler.num_batches

    # ====== the memory starts from real embeddings (one clean pass, each rank its rows) ======
    bank_labels, dtype = torch.as_tensor(labels), DTYPES[cfg.method.memory_dtype]
    memory = (ShardedMemoryBank(bank_labels, method.net.embed_dim, ctx, renormalize=cfg.method.memory_renormalize,
                                dtype=dtype)
              if ctx.distributed else
              MemoryBank(bank_labels, method.net.embed_dim, renormalize=cfg.method.memory_renormalize,
                         device=ctx.device, dtype=dtype))
    history, step, first_epoch, resumed = [], 0, 0, None
    meta = {"config": to_dict(with_overrides(cfg, {"method.name": method_name or cfg.method.name})),
            "in_channels": int(channels), "num_classes": int(labels.max()) + 1,
            "pipeline": dataclasses.asdict(pipeline_of(cfg, train))}   # what every consumer must apply
    fingerprint = config_fingerprint(meta["config"])
    if resume_from:
        saved = checkpoint.saved_config(resume_from)
        if saved is not None:
            check_resumable(saved, meta["config"], resume_from)
        state = checkpoint.load(resume_from, ctx, method=method, optimizer=optimizer, memory=memory)
        history, step, first_epoch, resumed = state["history"], state["step"], state["epoch"], state["partial"]
        if ctx.is_main:
            log(f"resumed from {resume_from} after epoch {first_epoch}"
                + (f" and {resumed['batches']} batches of the next" if resumed else ""))
    else:
        z0, _ = embed_sharded(method, train, cfg, ctx, eval_tf)
        memory.fill(torch.arange(memory.offset, memory.offset + len(z0)), z0)

    levels = test_levels or []
    level_labels = {lv: torch.as_tensor(train.labels_at(lv)) for lv in levels}
    val_idx = validation_indices(len(train), cfg.eval.val_size)

    def saver(epoch, at_step, batches=0, sums=None):
        """save(directory): the state after `epoch` epochs and `batches` global batches of the next."""
        def save(directory):
            partial = {"batches": batches, "sums": gather_sums(sums, ctx)} if batches else None
            checkpoint.save(directory, ctx, method=method, optimizer=optimizer, memory=memory, epoch=epoch,
                            step=at_step, history=history, fingerprint=fingerprint, meta=meta, partial=partial)
        return save

    def inside(epoch):                        # train_one_epoch's on_partial, told the epoch and given save
        return lambda batches, at_step, sums, due: on_partial(epoch + 1, batches, due,
                                                              saver(epoch, at_step, batches, sums))

    for epoch in range(first_epoch, cfg.optim.epochs):
        partial = resumed if epoch == first_epoch else None
        set_epoch(loader, epoch, partial["batches"] if partial else 0)
        start = time.time()
        stats, step = train_one_epoch(method, loader, optimizer, memory, cfg, ctx, step, total_steps, on_step,
                                      epoch, resumed_sums(partial["sums"], ctx) if partial else None,
                                      inside(epoch) if on_partial else None)
        stats.update(online_knn(memory, level_labels, val_idx, cfg, ctx))
        stats.update(epoch=epoch + 1, epoch_time_s=time.time() - start)
        history.append(stats)
        if ctx.is_main:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch")
            log(f"[{method_cls.__name__} {cfg.data.train_level}] epoch {epoch + 1}/{cfg.optim.epochs}: {shown}")
        if on_epoch is not None:
            on_epoch(epoch + 1, stats, saver(epoch + 1, step))
    ctx.share_buffers(method.net)                               # evaluate the checkpoint's model on every rank
    return method, eval_tf, history, memory


def fit(cfg: Config, train: Collection, query: Collection, ctx: DistContext = DistContext(),
        on_epoch: Optional[Callable] = None, log: Callable = print,
        resume_from: Optional[str] = None, on_step: Optional[Callable] = None,
        on_partial: Optional[Callable] = None) -> FitResult:
    """Train cfg.method at cfg.data.train_level and evaluate at every test level (every rank
    calls it; every rank returns the same metrics). The hooks: see train_method."""
    level = cfg.data.train_level
    test_levels = check_against_data(cfg, train)
    method_cls = get_method(cfg.method.name)
    if level == NONE_LEVEL and not method_cls.label_free(cfg):
        note = f"{cfg.method.name} has no label-free loss: nothing to learn at level 'none'"
        if ctx.is_main:
            log(f"skipped: {note}")
        return FitResult(None, skipped=note)
    labels = torch.as_tensor(train.labels_at(level))

    def train_stage(name, stage_labels):
        # this rank's block of the features only: gathering all N x d of them would not fit at scale
        m, tf, _, _ = train_method(cfg, train, stage_labels.numpy(), ctx, log=log, method_name=name)
        return embed_sharded(m, train, cfg, ctx, tf)[0], len(train), ctx

    labels = method_cls.prepare_labels(cfg, labels, train_stage)
    method, eval_tf, history, memory = train_method(cfg, train, labels.numpy(), ctx, on_epoch, log,
                                                    test_levels, resume_from=resume_from, on_step=on_step,
                                                    on_partial=on_partial)

    # ====== test time: only f and P remain; m_i = g(x_i) recomputed with the final weights ======
    shard, _ = embed_sharded(method, train, cfg, ctx, eval_tf)
    queries, query_logits = embed_sharded(method, query, cfg, ctx, eval_tf)
    queries = gather_rows(queries, len(query), ctx)
    query_logits = gather_rows(query_logits, len(query), ctx)
    metrics = evaluate(cfg, shard, memory.offset, train, queries, query, test_levels, ctx, query_logits)
    if train.unseen is not None:            # data.unseen: the held-out classes, with the k chosen on the seen ones
        coll, held = train.unseen
        u_shard, _ = embed_sharded(method, coll, cfg, ctx, eval_tf)
        u_queries = gather_rows(embed_sharded(method, held, cfg, ctx, eval_tf)[0], len(held), ctx)
        metrics.update(evaluate_unseen(cfg, u_shard, shard_bounds(len(coll), ctx.world_size, ctx.rank)[0], coll,
                                       u_queries, held, test_levels, {lv: metrics[f"k/{lv}"] for lv in test_levels},
                                       ctx))
    return FitResult(method, metrics, history, embeddings=shard, offset=memory.offset)
