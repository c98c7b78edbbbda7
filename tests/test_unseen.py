"""Coarse classes held out of training (data.unseen): the split, its refusals, and the unseen
metrics of a whole fit recomputed independently from the trained model's embeddings."""
import numpy as np
import pytest
import torch

import oracles
from grafit_core.config import config_from_dict
from grafit_core.data import load_dataset, prepare_data
from grafit_core.data.transforms import build_transform
from grafit_core.distributed import DistContext
from grafit_core.engine import embed, fit
from grafit_core.errors import ConfigError
from gloo import run_gloo

torch.set_num_threads(1)

JOB = {"data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                "options": {"branching": [3, 3, 2], "per_class": 5, "queries_per_class": 2}},
       "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
       "optim": {"epochs": 2, "batch_size": 16},
       "eval": {"val_size": 20, "k_candidates": [3, 5]}}


def job(unseen):
    return config_from_dict({**JOB, "data": {**JOB["data"], "unseen": unseen}})


def test_hold_out_by_name_keeps_the_drawer_split_the_images_and_the_label_ids():
    cfg = job({"classes": ["a2"]})
    full_train, full_query = load_dataset(cfg.data.name, cfg.data.root, cfg.data.options)
    train, query = prepare_data(cfg.data)
    coll, held = train.unseen
    a2 = train.hierarchy.classes["l0"].index("a2")
    for seen, out, full in ((train, coll, full_train), (query, held, full_query)):
        mask = full.labels_at("l0") == a2
        assert torch.equal(out.images, full.images[torch.from_numpy(mask)])        # queries stay queries
        assert torch.equal(seen.images, full.images[torch.from_numpy(~mask)])
        for lv in ("l0", "l1", "l2"):                                               # ids of the one hierarchy
            np.testing.assert_array_equal(out.labels_at(lv), full.labels_at(lv)[mask])
    assert query.unseen is None and coll.unseen is None


def test_a_held_out_fraction_is_drawn_with_its_seed():
    def held(seed):
        train, _ = prepare_data(job({"fraction": 0.34, "seed": seed}).data)   # 1 of the 3 classes
        return sorted(set(train.unseen[0].labels_at("l0").tolist()))
    assert held(0) == held(0) and len(held(0)) == 1
    assert len({tuple(held(s)) for s in range(6)}) > 1


@pytest.mark.parametrize("unseen, key", [({"classes": ["zz"]}, "data.unseen.classes: 'zz'"),
                                         ({"classes": ["a1", "a2", "a3"]}, "data.unseen.classes: every class"),
                                         ({"level": "l9", "fraction": 0.5}, "data.unseen.level: 'l9'"),
                                         ({"classes": ["a1"], "fraction": 0.3}, "data.unseen: give classes or"),
                                         ({"fraction": 1.0}, "data.unseen.fraction")])
def test_bad_holdouts_name_the_key(unseen, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        prepare_data(job(unseen).data, "x.yaml")


def fit_and_recompute(ctx, unseen):
    """A whole fit's metrics, and its unseen metrics recomputed from the trained model's embeddings
    of the held-out images in this one process (oracles: a stable sort, sklearn, a brute force)."""
    torch.set_num_threads(1)
    cfg = job(unseen)
    train, query = prepare_data(cfg.data)
    res = fit(cfg, train, query, ctx, log=lambda s: None)
    coll, held = train.unseen
    tf = build_transform(cfg.data.augment, cfg.data.image_size, 3, train=False)
    want = {}
    for suffix, (bank, queries) in (("/unseen", (coll, held)), ("", (train, query))):
        z, _ = embed(res.method, bank, cfg, DistContext(), tf)
        zq, _ = embed(res.method, queries, cfg, DistContext(), tf)
        for lv in ("l0", "l1", "l2"):
            cl, ql = torch.as_tensor(bank.labels_at(lv)), torch.as_tensor(queries.labels_at(lv))
            k = res.metrics[f"k/{lv}"]                        # chosen on the seen collection
            pred = oracles.knn_predict(zq, z, cl, k, cfg.eval_sigma, bank.num_classes(lv))
            want[f"knn_top1/{lv}{suffix}"] = (pred == ql).double().mean().item()
            want[f"map_cosine/{lv}{suffix}"] = oracles.retrieval_map(oracles.average_precisions(zq, ql, z, cl))
            at_r = oracles.map_at_r(oracles.scores(zq, z), ql[:, None] == cl[None])
            want[f"map_at_r/{lv}{suffix}"] = float(np.nanmean(at_r))
    return res.metrics, want


@pytest.mark.parametrize("world_size", [1, 2])
def test_fit_reports_unseen_metrics_equal_to_an_independent_recomputation(world_size):
    # W = 2: the held-out collection is embedded and evaluated sharded, like the seen one, by one model:
    # rank 0's, the checkpoint's (each rank's own BatchNorm statistics gave each shard another model)
    runs = [fit_and_recompute(DistContext(), {"classes": ["a2"]})] if world_size == 1 else \
        run_gloo(fit_and_recompute, 2, {"classes": ["a2"]})
    got, want = runs[0]
    assert all(r[0] == got for r in runs)                     # every rank reports the same metrics
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert not any(k.startswith(("map_cond/", "map_oracle/")) and k.endswith("/unseen") for k in got)
    assert got["knn_top1/l0/unseen"] == 1.0                   # one held-out class: every vote is right
