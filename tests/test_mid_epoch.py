"""Checkpoints inside an epoch (checkpoint.every_steps, issue 18): a run resumed in the middle of an
epoch, at the same or another world size, trains on every sample of that epoch exactly once; at the
same world size it is bitwise the uninterrupted run. The sample indices of every step are recorded."""
import os

import torch

from grafit_core.config import config_from_dict
from grafit_core.data import prepare_data
from grafit_core.data.views import GlobalBatches
from grafit_core.distributed import DistContext
from grafit_core.engine import fit
from gloo import run_gloo

torch.set_num_threads(1)
# 72 training images, global batch 16: 4 batches an epoch (8 images dropped), a checkpoint after each
JOB = {"seed": 3,
       "data": {"name": "synthetic", "train_level": "l1", "augment": "characters", "image_size": 16,
                "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
       "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
       "optim": {"epochs": 3, "batch_size": 16}, "checkpoint": {"every_steps": 1},
       "eval": {"val_size": 20, "k_candidates": [3, 5]}}
STOP = (2, 2)                                   # after 2 of the 4 global batches of epoch 2


class Stop(Exception):
    pass


def run(ctx, root, stop=None, resume=False):
    """fit, recording (epoch, this rank's indices) of every step; stop: save at (epoch, batches) and quit."""
    from grafit_core.methods import base
    seen, orig, epoch = [], base.Method.training_step, {"now": 0}

    def recorded(self, views, labels, indices, memory):
        seen.append((epoch["now"], indices.tolist()))
        return orig(self, views, labels, indices, memory)

    def on_partial(e, batches, due, save):
        assert due                                               # checkpoint.every_steps: 1
        if (e, batches) == stop:
            save(root)
            raise Stop

    base.Method.training_step = recorded
    cfg = config_from_dict(JOB)
    train, query = prepare_data(cfg.data)
    try:
        res = fit(cfg, train, query, ctx, log=lambda s: None, resume_from=root if resume else None,
                  on_step=lambda e, b: epoch.update(now=e), on_partial=on_partial)
    except Stop:
        return seen, None
    finally:
        base.Method.training_step = orig
    return seen, {"metrics": res.metrics, "losses": [h["loss"] for h in res.history],
                  "state": res.method.state_dict(), "memory": res.embeddings}


def gloo_run(ctx, root, stop=None, resume=False):
    return run(ctx, root, stop, resume)


def epoch_batches(epoch: int) -> list[list[int]]:
    """The global batches of `epoch` (1-based) as the sampler defines them, independently of W."""
    sampler = GlobalBatches(72, 16, 1, 0, JOB["seed"])
    sampler.set_epoch(epoch - 1)
    return [b for b in sampler]


def test_the_sample_order_does_not_depend_on_the_world_size():
    for world in (2, 4):
        for epoch in (1, 2):
            per_rank = []
            for rank in range(world):
                s = GlobalBatches(72, 16, world, rank, JOB["seed"])
                s.set_epoch(epoch - 1)
                per_rank.append(list(s))
            assert [sum((p[b] for p in per_rank), []) for b in range(4)] == epoch_batches(epoch)
    flat = sum(epoch_batches(2), [])
    assert len(flat) == len(set(flat)) == 64                   # each sample at most once, the tail dropped


def test_resumed_inside_an_epoch_at_the_same_world_size_is_bitwise_the_uninterrupted_run(tmp_path):
    full_seen, full = run(DistContext(), None)
    root = str(tmp_path / "ckpt")
    before, _ = run(DistContext(), root, stop=STOP)
    assert torch.load(os.path.join(root, "train_state.pt"), weights_only=True)["partial"]["batches"] == 2
    after, resumed = run(DistContext(), root, resume=True)
    assert before + after == full_seen                           # the same steps, each once, in order
    assert [i for e, i in after if e == 2] == epoch_batches(2)[2:]
    assert resumed["losses"] == full["losses"] and resumed["metrics"] == full["metrics"]
    assert all(torch.equal(full["state"][k], resumed["state"][k]) for k in full["state"])
    assert torch.equal(full["memory"], resumed["memory"])


def test_two_workers_resume_bitwise_and_one_worker_resumes_the_rest_of_their_epoch(tmp_path):
    full = run_gloo(gloo_run, 2, None)
    root = str(tmp_path / "ckpt")
    before = run_gloo(gloo_run, 2, root, STOP)
    after = run_gloo(gloo_run, 2, root, None, True)
    for rank in range(2):                                        # the same world size: bitwise
        assert before[rank][0] + after[rank][0] == full[rank][0]
        assert after[rank][1]["losses"] == full[rank][1]["losses"]
        assert after[rank][1]["metrics"] == full[rank][1]["metrics"]
        assert all(torch.equal(full[rank][1]["state"][k], after[rank][1]["state"][k]) for k in full[rank][1]["state"])
    # another world size: one worker continues the two workers' epoch 2 from its third global batch
    one, res = run(DistContext(), root, resume=True)
    trained_before = [sum((before[r][0][b][1] for r in range(2)), []) for b in range(len(before[0][0]))
                      if before[0][0][b][0] == 2]
    trained_after = [i for e, i in one if e == 2]
    assert trained_before + trained_after == epoch_batches(2)    # every sample of epoch 2 exactly once
    assert [i for e, i in one if e == 3] == epoch_batches(3)
    assert len(res["losses"]) == 3 and res["losses"][0] == full[0][1]["losses"][0]
