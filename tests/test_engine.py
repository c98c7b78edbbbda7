"""The training loop: leakage, determinism, level `none`, schedules, and the whole fit on synthetic data."""
import math

import numpy as np
import pytest
import torch

from grafit_core.config import config_from_dict
from grafit_core.data import load_dataset
from grafit_core.data.images import TensorCollection
from grafit_core.engine import fit, lr_at
from grafit_core.errors import ConfigError
from grafit_core.methods.clusterfit import spherical_kmeans

torch.set_num_threads(1)

SMALL = {"data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                  "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
         "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
         "optim": {"epochs": 2, "batch_size": 16},
         "eval": {"val_size": 20, "k_candidates": [3, 5]}}


def small_cfg(**sections):
    data = {k: dict(v) for k, v in SMALL.items()}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


@pytest.fixture(scope="module")
def synthetic():
    cfg = small_cfg()
    return load_dataset(cfg.data.name, cfg.data.root, cfg.data.options)


def permuted_fine(coll, levels, seed=1):
    """The same images and training-level labels, with the finer levels' labels shuffled."""
    rng = np.random.default_rng(seed)
    labels = {lv: (rng.permutation(v) if lv in levels else v.copy()) for lv, v in coll.labels.items()}
    return TensorCollection(coll.name, coll.hierarchy, labels, coll.images)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["grafit", "ce"])
def test_fine_labels_never_reach_training(synthetic, method):
    """Training at l0 with the l1/l2 labels permuted is bitwise identical (weights and losses)."""
    train, query = synthetic
    cfg = small_cfg(method={"name": method})
    a = fit(cfg, train, query, log=lambda s: None)
    b = fit(cfg, permuted_fine(train, ["l1", "l2"]), query, log=lambda s: None)
    assert state_equal(a.method, b.method)
    for ha, hb in zip(a.history, b.history):
        assert ha["loss"] == hb["loss"]
    # the permutation does change what the fine-level evaluation sees
    assert a.metrics["map_cosine/l2"] != b.metrics["map_cosine/l2"]


def test_same_seed_same_run_other_seed_other_run(synthetic):
    train, query = synthetic
    a = fit(small_cfg(), train, query, log=lambda s: None)
    b = fit(small_cfg(), train, query, log=lambda s: None)
    c = fit(config_from_dict({**SMALL, "seed": 1}), train, query, log=lambda s: None)
    assert state_equal(a.method, b.method) and a.metrics == b.metrics
    assert not state_equal(a.method, c.method)


def test_level_none_skips_methods_without_label_free_loss(synthetic):
    train, query = synthetic
    notes = []
    res = fit(small_cfg(method={"name": "ce"}, data={"train_level": "none"}), train, query, log=notes.append)
    assert res.method is None and "no label-free loss" in res.skipped and notes
    res = fit(small_cfg(method={"name": "snca+"}, data={"train_level": "none"}), train, query, log=lambda s: None)
    assert res.skipped
    res = fit(small_cfg(method={"name": "grafit"}, data={"train_level": "none"}), train, query, log=lambda s: None)
    assert res.skipped is None
    # with one class the kNN loss is -log 1 = 0: only the instance loss trains
    assert all(abs(h["knn"]) < 1e-6 for h in res.history)
    assert "map_cond/l2" not in res.metrics and "map_cosine/l2" in res.metrics


def test_fit_reports_every_metric_and_chosen_k(synthetic):
    train, query = synthetic
    res = fit(small_cfg(), train, query, log=lambda s: None)
    for lv in ("l0", "l1", "l2"):
        assert res.metrics[f"k/{lv}"] in (3, 5)
        for key in ("knn_top1", "map_cosine", "map_cond", "map_oracle"):
            assert 0.0 <= res.metrics[f"{key}/{lv}"] <= 1.0
        assert res.metrics[f"map_skipped/{lv}"] == 0
    # oracle conditioning on l0 puts every relevant l0 item first: mAP at l0 is exactly 1
    assert res.metrics["map_oracle/l0"] == 1.0
    assert len(res.history) == 2 and all("online_knn_top1/l2" in h for h in res.history)


def test_clusterfit_trains_on_pseudo_labels(synthetic):
    train, query = synthetic
    res = fit(small_cfg(method={"name": "clusterfit+", "clusters": 4}), train, query, log=lambda s: None)
    assert res.method.net.classifier.out_features == 4


def test_lr_schedule_by_hand():
    # warm-up over 4 steps: base * (step+1)/4
    assert [lr_at(s, 20, 4, 0.4) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # cosine afterwards: half-way through the remaining 16 steps -> base / 2
    assert lr_at(12, 20, 4, 0.4) == pytest.approx(0.2)
    assert lr_at(20, 20, 4, 0.4) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(6, 20, 4, 0.4) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 2 / 16)))


def test_spherical_kmeans_recovers_separated_clusters():
    from sklearn.metrics import adjusted_rand_score
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:4] * 5
    truth = torch.arange(4).repeat_interleave(25)
    x = centers[truth] + 0.3 * torch.randn(100, 8, generator=g)
    assert adjusted_rand_score(truth.numpy(), spherical_kmeans(x, 4).numpy()) == 1.0


@pytest.mark.parametrize("section,values,key", [
    ("data", {"train_level": "species"}, "data.train_level"),
    ("data", {"test_levels": ["l0", "genus"]}, "data.test_levels"),
    ("eval", {"k": 10_000}, "eval.k"),
    ("optim", {"batch_size": 100_000}, "optim.batch_size"),
])
def test_dataset_dependent_errors_name_the_key(synthetic, section, values, key):
    train, query = synthetic
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        fit(small_cfg(**{section: values}), train, query, log=lambda s: None)


def test_eval_grid_evaluates_every_value_from_one_training(synthetic, monkeypatch):
    """k and the voting sigma are evaluation-only: one training, one metric set per value,
    each equal to a run configured with that value alone."""
    import grafit_core.engine as engine
    train, query = synthetic
    fits = []
    real = engine.train_method
    monkeypatch.setattr(engine, "train_method", lambda *a, **k: fits.append(1) or real(*a, **k))
    variants = {"eval.k": [3, 5, "auto"], "eval.sigma": [0.05, 0.5]}
    grid = config_from_dict({**SMALL, "eval": {**SMALL.get("eval", {}), "grid": variants}})
    res = fit(grid, train, query, log=lambda s: None)
    assert len(fits) == 1
    for k, sigma in [(3, 0.05), (5, 0.5), ("auto", 0.5)]:
        alone = fit(small_cfg(eval={"k": k, "sigma": sigma}), train, query, log=lambda s: None).metrics
        suffix = f"k{k}_esigma{sigma}"
        for key in ("knn_top1/l2", "map_cond/l1", "k/l1", "coarse_top1/l0"):
            assert res.metrics[f"{key}/{suffix}"] == alone[key], (key, suffix)
        assert res.metrics["map_cosine/l2"] == alone["map_cosine/l2"]
    assert len(fits) == 4
