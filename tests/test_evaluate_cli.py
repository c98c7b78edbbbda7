"""`grafit evaluate`: a trained checkpoint on a nested-folder collection, split per class by name."""
import json
import os
import shutil

import numpy as np
import pytest
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

    # a file rewritten at the same size (another image, same bytes count): the index is rebuilt
    img = data / "A" / "a1" / "img00.png"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert grafit(base) == 0
    assert json.loads(capsys.readouterr().out)["index_built"]
    # several queries with --json: one JSON object per line
    assert grafit([*base[:2], str(data / "A" / "a1" / "img01.png"), *base[2:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["query"] for line in lines] == [str(q), str(data / "A" / "a1" / "img01.png")]


def folders_job(root) -> dict:
    return {**JOB, "data": {"name": "folders", "root": str(root), "train_level": "category", "augment": "characters",
                            "image_size": 16, "options": {"levels": ["category", "item"], "query_fraction": 0.4,
                                                          "seed": 3}},
            "optim": {"epochs": 2, "batch_size": 4}, "eval": {"val_size": 5, "k_candidates": [1]}}


def test_a_model_on_its_own_training_folder_is_evaluated_on_its_held_out_queries(tmp_path, capsys):
    # trained on a random split: the last quarter by name would hold training images; its own split has none
    data = tmp_path / "catalog"
    write_tree(str(data))
    cfg = config_from_dict(folders_job(data))
    train, query = prepare_data(cfg.data)
    ckpt, half = tmp_path / "ckpt", tmp_path / "half"
    res = fit(cfg, train, query, log=lambda s: None,
              on_epoch=lambda e, s, save: [save(str(ckpt)), e == 1 and save(str(half))])
    assert grafit(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--k", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "training's" and (out["collection"], out["queries"]) == (len(train), len(query))
    assert out["trained"] == {"epoch": 2, "of": 2, "batches": 0} and out["conditioned_on"] == "category"
    for level, metrics in out["levels"].items():
        for metric, value in metrics.items():
            if metric != "k":
                assert value == res.metrics[f"{metric}/{level}"], (level, metric)
    assert "map_cond" in out["levels"]["item"] and "map_cond" not in out["levels"]["category"]

    def refused(*argv) -> str:
        assert grafit(["evaluate", *argv]) == 2
        return capsys.readouterr().err

    assert "--query-fraction: " + str(data) + " is the folder the model was trained on" in refused(
        "--checkpoint", str(ckpt), "--data", str(data), "--query-fraction", "0.25")
    assert f"--data {data / 'A'}: overlaps {data}, the folder the model was trained on" in refused(
        "--checkpoint", str(ckpt), "--data", str(data / "A"))
    single = tmp_path / "single"
    (single / "A" / "a1").mkdir(parents=True)
    shutil.copy(data / "A" / "a1" / "img00.png", single / "A" / "a1")
    assert f"--data {single}: no query image" in refused("--checkpoint", str(ckpt), "--data", str(single))
    # a checkpoint saved in the middle of its training says so; a broken one is one line
    assert grafit(["evaluate", "--checkpoint", str(half), "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trained"]["epoch"] == 1
    assert f"--checkpoint {half} was saved after 1 of 2 epochs: not its training's end" in captured.err
    (half / "train_state.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")   # an LFS pointer
    assert refused("--checkpoint", str(half), "--data", str(data)).strip() == \
        f"grafit: error: --checkpoint: {half / 'train_state.pt'}: a Git LFS pointer, not the checkpoint's file " \
        f"(git lfs pull)"
    (half / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")                     # a torch zip cut short
    err = refused("--checkpoint", str(half), "--data", str(data))
    assert len(err.strip().splitlines()) == 1 and err.startswith(
        f"grafit: error: --checkpoint: {half / 'train_state.pt'}: not a readable checkpoint (")
    with pytest.raises(SystemExit):
        grafit(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--k", "0"])
    assert "argument --k: expected auto or an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grafit(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--query-fraction", "1"])
    assert "argument --query-fraction: expected a number in [0, 1), got '1'" in capsys.readouterr().err
