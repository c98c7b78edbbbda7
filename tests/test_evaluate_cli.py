"""`grafit evaluate`: a trained checkpoint on a nested-folder collection, split per class by name."""
import json
import os

import numpy as np
import torch
from PIL import Image

from grafit_core.config import config_from_dict
from grafit_core.data import prepare_data
from grafit_core.data.transforms import build_transform
from grafit_core.engine import fit
from orchestrator.cli import main as grafit

torch.set_num_threads(1)
JOB = {"data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
       "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
       "optim": {"epochs": 1, "batch_size": 16}, "eval": {"val_size": 20, "k_candidates": [3, 5]}}
# fine class -> number of files; expected split (collection, queries) with fraction 0.25:
# 4 -> 3 + 1, 1 -> 1 + 0 (a single file stays in the collection), 3 -> 2 + 1, 5 -> 3 + 2
TREE = {("A", "a1"): 4, ("A", "a2"): 1, ("B", "b1"): 3, ("B", "b2"): 5}


def write_tree(root):
    rng = np.random.default_rng(0)
    for (coarse, fine), n in TREE.items():
        os.makedirs(os.path.join(root, coarse, fine))
        base = rng.integers(0, 255, (16, 16, 3))
        for i in range(n):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, coarse, fine, f"img{i:02d}.png"))


def test_evaluate_a_checkpoint_on_new_folders(tmp_path, capsys):
    cfg = config_from_dict(JOB)
    train, query = prepare_data(cfg.data)
    ckpt = tmp_path / "ckpt"
    res = fit(cfg, train, query, on_epoch=lambda e, s, save: save(str(ckpt)), log=lambda s: None)
    data = tmp_path / "catalog"
    write_tree(str(data))
    assert grafit(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--levels", "category,item",
                   "--k", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["collection"], out["queries"]) == (9, 4)
    assert set(out["levels"]) == {"category", "item"}
    item = out["levels"]["item"]
    assert set(item) >= {"knn_top1", "map_cosine", "map_cond", "map_oracle", "k"} and item["k"] == 1

    # independent check of kNN top-1 with k = 1: nearest collection image by cosine, in numpy
    tf = build_transform("characters", 16, 3, train=False)
    net = res.method.eval()
    coll, queries = [], []
    for (coarse, fine), n in TREE.items():
        names = sorted(os.listdir(data / coarse / fine))
        keep = max(1, int(np.floor(0.75 * n + 1e-9)))
        for i, name in enumerate(names):
            img = torch.from_numpy(np.array(Image.open(data / coarse / fine / name).convert("RGB"))).permute(2, 0, 1)
            (coll if i < keep else queries).append((net.embed(tf(img)[None])[0][0].numpy(), fine))
    bank = np.stack([z for z, _ in coll])
    hits = [coll[int(np.argmax(bank @ z))][1] == label for z, label in queries]
    assert item["knn_top1"] == sum(hits) / len(hits)


def test_evaluate_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    assert grafit(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a grafit checkpoint" in capsys.readouterr().err


def test_search_ranks_the_collection_reuses_its_index_and_conditions_on_a_coarse_class(tmp_path, capsys):
    import shutil
    cfg = config_from_dict(JOB)
    train, query = prepare_data(cfg.data)
    ckpt = tmp_path / "ckpt"
    fit(cfg, train, query, on_epoch=lambda e, s, save: save(str(ckpt)), log=lambda s: None)
    data = tmp_path / "catalog"
    write_tree(str(data))
    q = tmp_path / "query.png"
    shutil.copy(data / "B" / "b2" / "img03.png", q)
    base = ["search", str(q), "--checkpoint", str(ckpt), "--collection", str(data), "--levels", "category,item",
            "--index-dir", str(tmp_path / "index"), "--json", "--top", "13"]

    assert grafit(base) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["index_built"] and os.path.exists(first["index"])
    top = first["results"][0]
    assert top["path"].endswith(os.path.join("B", "b2", "img03.png")) and abs(top["score"] - 1) < 1e-5
    assert len(first["results"]) == 13 and [r["rank"] for r in first["results"]] == list(range(1, 14))

    assert grafit(base + ["--coarse", "A"]) == 0
    cond = json.loads(capsys.readouterr().out)
    assert not cond["index_built"] and cond["index"] == first["index"]        # reused, not rebuilt
    assert [r["category"] for r in cond["results"]] == ["A"] * 5 + ["B"] * 8  # A's 5 items first
    # within a coarse class the order is the cosine order
    b_cos = [r["path"] for r in first["results"] if r["category"] == "B"]
    assert [r["path"] for r in cond["results"][5:]] == b_cos

    for extra, expected in (([], first), (["--coarse", "A"], cond)):    # faiss flat: the same ranking
        assert grafit(base + extra + ["--backend", "faiss"]) == 0
        got = json.loads(capsys.readouterr().out)["results"]
        assert [r["path"] for r in got] == [r["path"] for r in expected["results"]]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected["results"]], atol=1e-5)

    assert grafit(base + ["--coarse", "Z"]) == 2
    assert "--coarse 'Z': not a class of level 'category'" in capsys.readouterr().err
