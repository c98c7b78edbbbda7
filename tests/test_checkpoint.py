"""Checkpoints: resuming is bitwise the uninterrupted run; memory files reshard to another worker count."""
import math
import os

import pytest
import torch

from grafit_core import checkpoint
from grafit_core.config import config_from_dict
from grafit_core.data import prepare_data
from grafit_core.distributed import DistContext
from grafit_core.engine import fit
from grafit_core.memory import MemoryBank, shard_bounds
from gloo import run_gloo

torch.set_num_threads(1)
JOB = {"seed": 5,
       "data": {"name": "synthetic", "train_level": "l1", "augment": "characters", "image_size": 16,
                "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
       "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
       "optim": {"epochs": 3, "batch_size": 16},
       "eval": {"val_size": 20, "k_candidates": [3, 5]}}


def saving(root):
    def on_epoch(epoch, stats, save):
        save(os.path.join(root, f"epoch{epoch}"))
    return on_epoch


def test_resume_from_any_epoch_is_bitwise_the_uninterrupted_run(tmp_path):
    cfg = config_from_dict(JOB)
    train, query = prepare_data(cfg.data)
    full = fit(cfg, train, query, on_epoch=saving(str(tmp_path)), log=lambda s: None)
    for epoch in (1, 2):
        resumed = fit(cfg, train, query, resume_from=str(tmp_path / f"epoch{epoch}"), log=lambda s: None)
        assert resumed.metrics == full.metrics
        assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
        a, b = full.method.state_dict(), resumed.method.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    files = sorted(os.listdir(tmp_path / "epoch3"))
    assert files == ["memory_000000000000_000000000072.pt", "train_state.pt"]
    state = torch.load(tmp_path / "epoch3" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 3 and any(k.startswith("target.") for k in state["method"])


def sharded_run(ctx, job, root):
    cfg = config_from_dict(job)
    train, query = prepare_data(cfg.data)
    rows = {}

    def on_epoch(epoch, stats, save):
        save(root)                             # every rank writes its part into one directory
    fit(cfg, train, query, ctx, on_epoch=on_epoch, log=lambda s: None)
    part = torch.load(os.path.join(root, "memory_{:012d}_{:012d}.pt".format(
        *shard_bounds(len(train), ctx.world_size, ctx.rank))), weights_only=True)
    rows[ctx.rank] = part["bank"]
    return rows


def test_memory_written_by_two_workers_reshards_to_one_and_three(tmp_path):
    job = {**JOB, "optim": {"epochs": 1, "batch_size": 16}}
    parts = run_gloo(sharded_run, 2, job, str(tmp_path))
    full_bank = torch.cat([parts[0][0], parts[1][1]])
    assert full_bank.shape == (72, 16)
    for world in (1, 3):
        for rank in range(world):
            lo, hi = shard_bounds(72, world, rank)
            memory = MemoryBank(torch.zeros(hi - lo, dtype=torch.long), 16, offset=lo)
            for start, stop, path in checkpoint.memory_files(str(tmp_path)):
                a, b = max(lo, start), min(hi, stop)
                if a < b:
                    memory.bank[a - lo:b - lo] = torch.load(path, weights_only=True)["bank"][a - start:b - start]
            assert torch.equal(memory.bank, full_bank[lo:hi])


def test_load_refuses_a_checkpoint_missing_rows(tmp_path):
    cfg = config_from_dict({**JOB, "optim": {"epochs": 1, "batch_size": 16}})
    train, query = prepare_data(cfg.data)
    fit(cfg, train, query, on_epoch=saving(str(tmp_path)), log=lambda s: None)
    os.remove(tmp_path / "epoch1" / "memory_000000000000_000000000072.pt")
    with pytest.raises(FileNotFoundError, match=r"memory rows \[0, 72\)"):
        fit(cfg, train, query, resume_from=str(tmp_path / "epoch1"), log=lambda s: None)


def test_checkpoint_files_are_written_atomically(tmp_path, monkeypatch):
    good = tmp_path / "x.pt"
    checkpoint.atomic_save({"v": torch.ones(2)}, str(good))

    def dies(obj, path):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"v": torch.zeros(2)}, str(good))
    monkeypatch.undo()
    assert torch.equal(torch.load(good, weights_only=True)["v"], torch.ones(2))


def test_distributed_context_defaults_to_one_process():
    assert DistContext().world_size == 1 and DistContext().is_main


def ce_with_tiny_query(ctx, job):
    """CE (whose softmax head gives p_c) with 2 queries over 3 ranks: one rank's query shard is empty."""
    from grafit_core.data.images import split_collection
    cfg = config_from_dict({**job, "method": {"name": "ce"}})
    train, query = prepare_data(cfg.data)
    return fit(cfg, train, split_collection(query, [0, 1], "two-queries"), ctx, log=lambda s: None).metrics


def test_empty_query_shard_does_not_hang_the_gather():
    results = run_gloo(ce_with_tiny_query, 3, {**JOB, "optim": {"epochs": 1, "batch_size": 12}})
    assert results[0] == results[1] == results[2] and "map_cond/l2" in results[0]


def test_resume_refuses_a_checkpoint_of_another_config_but_not_more_epochs(tmp_path):
    from grafit_core.config import config_fingerprint, to_dict, with_overrides
    from grafit_core.errors import ConfigError
    cfg = config_from_dict({**JOB, "optim": {"epochs": 1, "batch_size": 16}})
    train, query = prepare_data(cfg.data)
    fit(cfg, train, query, on_epoch=saving(str(tmp_path)), log=lambda s: None)
    other = with_overrides(cfg, {"method.sigma": 0.2, "model.embed_dim": 16})
    with pytest.raises(ConfigError, match=r"epoch1: the checkpoint was written by another config "
                                          r"\(method.sigma: 0.05 in the checkpoint, 0.2 now\)"):
        fit(other, train, query, resume_from=str(tmp_path / "epoch1"), log=lambda s: None)
    longer = with_overrides(cfg, {"optim.epochs": 2, "eval.k": 3, "name": "renamed"})
    res = fit(longer, train, query, resume_from=str(tmp_path / "epoch1"), log=lambda s: None)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert config_fingerprint(to_dict(cfg)) == config_fingerprint(to_dict(longer))
    assert config_fingerprint(to_dict(cfg)) != config_fingerprint(to_dict(other))


def test_ray_run_with_a_changed_config_is_refused_before_ray_starts(tmp_path):
    pytest.importorskip("ray")
    from grafit_core.config import with_overrides
    from grafit_core.errors import ConfigError
    from orchestrator.workers import run_training
    cfg = config_from_dict({**JOB, "optim": {"epochs": 1, "batch_size": 16}})
    train, query = prepare_data(cfg.data)
    ckpt = tmp_path / "runs" / "job" / "checkpoint_2026-01-01_00-00-00.000000"
    fit(cfg, train, query, on_epoch=lambda e, s, save: save(str(ckpt)), log=lambda s: None)
    with pytest.raises(ConfigError, match="method.tau_base: 0.99 in the checkpoint, 0.9 now"):
        run_training(with_overrides(cfg, {"method.tau_base": 0.9}), workers=1, storage_path=str(tmp_path / "runs"),
                     name="job")                   # no ray.init in this test: refused before any Ray call


def _nan_on_one_rank(ctx, root):
    """Rank 1's loss turns NaN at its 6th step (epoch 2): both ranks must stop there, together."""
    from grafit_core.methods import base
    orig, calls = base.Method.training_step, {"n": 0}

    def step(self, *args):
        loss, parts, z = orig(self, *args)
        calls["n"] += 1
        return (loss * float("nan") if ctx.rank == 1 and calls["n"] == 6 else loss), parts, z

    base.Method.training_step = step
    cfg = config_from_dict(JOB)
    train, query = prepare_data(cfg.data)
    try:
        fit(cfg, train, query, ctx, on_epoch=saving(root), log=lambda s: None)
    except FloatingPointError as err:
        return str(err)
    return "no error"


def test_a_nan_loss_on_one_worker_stops_every_worker_and_keeps_the_last_checkpoint(tmp_path):
    messages = run_gloo(_nan_on_one_rank, 2, str(tmp_path))
    shared = [m.split(" (this worker")[0] for m in messages]
    assert shared[0] == shared[1]                             # same step, same words, nobody hangs
    assert messages[0].startswith("non-finite loss at epoch 2, step 2 of the epoch, on 1 of 2 worker(s)")
    assert "the checkpoint of epoch 1 is the last good one" in messages[0]
    assert sorted(os.listdir(tmp_path)) == ["epoch1"]
    cfg = config_from_dict(JOB)                               # and it resumes
    train, query = prepare_data(cfg.data)
    res = fit(cfg, train, query, resume_from=str(tmp_path / "epoch1"), log=lambda s: None)
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in res.history)
