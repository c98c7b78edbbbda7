"""Checkpoints of a (possibly sharded) training run, as plain files in one directory.

    train_state.pt                  rank 0: method (online + target), optimizer, epoch, step, history,
                                    partial (inside an epoch: its global batches done, their loss sums)
    memory_<start>_<stop>.pt        each rank: the memory rows it owns, by global index range

Memory files are keyed by global index range, so a restart with another worker count
reshards by reading the ranges that overlap its own. No RNG state: the sample order and each
sample's augmentations are seeded by (seed, epoch, index) (grafit_core.data.views). Every file is written atomically
(temporary name, then rename) and loaded with weights_only=True (no arbitrary unpickling).
"""
from __future__ import annotations

import glob
import os
import re

import torch

from grafit_core.memory import MemoryBank

_MEMORY = re.compile(r"memory_(\d+)_(\d+)\.pt$")


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)                      # a writer killed mid-write leaves the old file


def save(directory: str, ctx, *, method, optimizer, memory: MemoryBank, epoch: int, step: int,
         history: list, fingerprint: str = "", meta: dict | None = None, partial: dict | None = None) -> None:
    """Write this rank's part of the checkpoint into `directory` (shared or per rank).
    meta: what rebuilds the model without the job file (config, in_channels, num_classes);
    partial: {"batches", "sums"} for a checkpoint inside epoch `epoch` + 1 (None at an epoch's end)."""
    os.makedirs(directory, exist_ok=True)
    if ctx.is_main:
        atomic_save({"method": method.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "step": step, "history": history, "fingerprint": fingerprint, "meta": meta or {},
                     "partial": partial}, os.path.join(directory, "train_state.pt"))
    start, stop = memory.offset, memory.offset + len(memory)
    atomic_save({"bank": memory.bank.cpu(), "filled": memory.filled.cpu()},
                os.path.join(directory, f"memory_{start:012d}_{stop:012d}.pt"))


def memory_files(directory: str) -> list[tuple[int, int, str]]:
    out = []
    for path in glob.glob(os.path.join(directory, "memory_*.pt")):
        m = _MEMORY.search(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(out)


def covers(directory: str, n: int) -> bool:
    """Whether the memory files hold every row [0, n) (each rank uploads its own: a checkpoint read while
    they arrive, or left by a node that died in between, may lack some)."""
    end = 0
    for start, stop, _ in memory_files(directory):
        if start > end:
            return False
        end = max(end, stop)
    return end >= n


def load(directory: str, ctx, *, method, optimizer, memory: MemoryBank) -> dict:
    """Restore method, optimizer and this rank's memory rows; returns {epoch, step, history,
    fingerprint, partial}."""
    state = torch.load(os.path.join(directory, "train_state.pt"), map_location="cpu", weights_only=True)
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    lo, hi = memory.offset, memory.offset + len(memory)
    covered = 0
    for start, stop, path in memory_files(directory):
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        part = torch.load(path, map_location="cpu", weights_only=True)
        memory.bank[a - lo:b - lo] = part["bank"][a - start:b - start].to(memory.bank)
        memory.filled[a - lo:b - lo] = part["filled"][a - start:b - start].to(memory.filled)
        covered += b - a
    if covered != hi - lo:
        raise FileNotFoundError(f"{directory}: memory rows [{lo}, {hi}) are not all in the checkpoint")
    return {"partial": state.get("partial"), **{k: state[k] for k in ("epoch", "step", "history", "fingerprint")}}


def progress(directory: str) -> tuple[int, int]:
    """(epochs done, global batches of the next epoch done) of a training or fine-tuning checkpoint."""
    for name in ("train_state.pt", "finetune_state.pt"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            state = torch.load(path, map_location="cpu", weights_only=True)
            return state["epoch"], (state.get("partial") or {}).get("batches", 0)
    raise FileNotFoundError(f"{directory}: neither train_state.pt nor finetune_state.pt")


def saved_config(directory: str) -> dict | None:
    """The config a checkpoint was written with (None for a checkpoint that does not record it)."""
    path = os.path.join(directory, "train_state.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return (state.get("meta") or {}).get("config")


def load_trained(directory: str):
    """(config, method in eval mode, meta) from a checkpoint directory (f and P for inference);
    meta["pipeline"] is the Pipeline every consumer applies to image files; meta["trained"] how far
    its training had gone (epoch, of epochs, batches of the next epoch). Raises FileNotFoundError or
    ValueError naming the file."""
    from grafit_core.config import config_from_dict
    from grafit_core.data.pipeline import pipeline_from_meta
    from grafit_core.methods import get_method
    path = os.path.join(directory, "train_state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no train_state.pt (not a grafit checkpoint)")
    with open(path, "rb") as f:
        if f.read(64).startswith(b"version https://git-lfs"):
            raise ValueError(f"{path}: a Git LFS pointer, not the checkpoint's file (git lfs pull)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                  # cut short, not a torch file, objects weights_only refuses
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from None
    meta = state.get("meta") or {}
    if "config" not in meta:
        raise ValueError(f"{path}: the checkpoint does not record its config (written by an older version)")
    # checkpoints written before orchestrator/job.py also hold the orchestrator's sections
    cfg = config_from_dict({k: v for k, v in meta["config"].items() if k not in ("sweep", "matrix", "tracking")}, path)
    meta["pipeline"] = pipeline_from_meta(cfg, meta)
    method = get_method(cfg.method.name)(cfg, meta["in_channels"], meta["num_classes"])
    try:
        method.load_state_dict(state["method"])
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{path}: its weights do not fit the network its config describes "
                         f"({str(err).splitlines()[0][:200]})") from None
    meta["trained"] = {"epoch": state.get("epoch"), "of": cfg.optim.epochs,
                       "batches": (state.get("partial") or {}).get("batches", 0)}
    return cfg, method.eval(), meta
