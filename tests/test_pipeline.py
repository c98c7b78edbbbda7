"""What a model was trained on travels with it (issue 16): `grafit evaluate` and `grafit search` read
files as training read them (here: Omniglot's inversion), from the checkpoint alone."""
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from grafit_core.config import config_from_dict
from grafit_core.data import prepare_data
from grafit_core.engine import fit
from orchestrator.cli import main as grafit

torch.set_num_threads(1)
ALPHABETS = {"Greek": 3, "Latin": 2, "Runic": 2}          # characters per alphabet


def write_omniglot(root) -> str:
    """Omniglot's layout and names: black strokes on white, 20 drawers per character."""
    rng = np.random.default_rng(0)
    for alpha, chars in ALPHABETS.items():
        style = rng.integers(0, 2, (5, 5))                   # an alphabet's strokes share a style
        for c in range(1, chars + 1):
            glyph = (style + rng.integers(0, 2, (5, 5))) > 1
            for d in range(1, 21):
                img = np.kron(glyph, np.ones((4, 4))) * 255.0
                img = np.roll(img, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) + rng.normal(0, 20, img.shape)
                name = f"{alpha[0]}{c:03d}_{d:02d}.png"
                path = os.path.join(root, "images_background", alpha, f"character{c:02d}", name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(255 - np.clip(img, 0, 255).astype(np.uint8), mode="L").save(path)
    return os.path.join(str(root), "images_background")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    folder = write_omniglot(tmp / "omniglot")
    cfg = config_from_dict({"data": {"name": "omniglot", "root": str(tmp / "omniglot"), "train_level": "alphabet",
                                     "augment": "characters", "image_size": 16},   # Omniglot's default cache
                            "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
                            "optim": {"epochs": 2, "batch_size": 16},
                            # one candidate: conditioned mAP takes p_c from the vote at the training
                            # level's k, and `grafit evaluate --k` sets one k for every level
                            "eval": {"val_size": 30, "k_candidates": [5]}})
    train, query = prepare_data(cfg.data)
    assert train.invert                                       # the loader inverts: ink bright on black
    ckpt = tmp / "ckpt"
    res = fit(cfg, train, query, on_epoch=lambda e, s, save: save(str(ckpt)), log=lambda s: None)
    return folder, str(ckpt), res, train


def evaluate(capsys, ckpt, folder, k, *flags) -> dict:
    assert grafit(["evaluate", "--checkpoint", ckpt, "--data", folder, "--levels", "alphabet,character",
                   "--k", str(k), *flags]) == 0
    return json.loads(capsys.readouterr().out)["levels"]


def test_evaluate_on_the_training_folder_reproduces_the_run(trained, capsys, tmp_path):
    folder, ckpt, res, _ = trained
    k = int(res.metrics["k/character"])
    assert res.metrics["k/alphabet"] == k                    # one k (one candidate): one --k reproduces both
    got = evaluate(capsys, ckpt, folder, k)                   # the training folder: split as training split it
    for level, metrics in (("alphabet", ("knn_top1", "map_cosine")),
                           ("character", ("knn_top1", "map_cosine", "map_cond", "map_oracle"))):
        for metric in metrics:
            assert got[level][metric] == res.metrics[f"{metric}/{level}"], (level, metric)
    # conditioned on alphabets (the training level), alphabet-level conditioned mAP is 1.0 by construction
    assert not {"map_cond", "map_oracle"} & got["alphabet"].keys()
    # a copy of it is another folder, split by name: drawers 16-20 are the last quarter, the same queries
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)
    assert evaluate(capsys, ckpt, copy, k, "--query-fraction", "0.25") == got
    # a checkpoint written before the pipeline was recorded takes it from its config: the same numbers
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    state = torch.load(old / "train_state.pt", weights_only=True)
    del state["meta"]["pipeline"]
    torch.save(state, old / "train_state.pt")
    assert evaluate(capsys, str(old), copy, k) == got
    # what the pipeline prevents: the same files read without the inversion give another answer
    state["meta"]["pipeline"] = {"channels": 1, "invert": False, "augment": "characters", "image_size": 16,
                                 "decoded_size": 32}
    torch.save(state, old / "train_state.pt")
    assert evaluate(capsys, str(old), copy, k)["character"]["map_cosine"] != got["character"]["map_cosine"]


def test_search_and_its_index_embed_the_collection_as_the_run_exported_it(trained, capsys, tmp_path):
    folder, ckpt, res, train = trained
    query = os.path.join(folder, "Greek", "character01", "G001_03.png")     # a training image
    argv = ["search", query, "--checkpoint", ckpt, "--collection", folder, "--levels", "alphabet,character",
            "--index-dir", str(tmp_path / "index"), "--json", "--top", "1"]
    assert grafit(argv) == 0
    out = json.loads(capsys.readouterr().out)
    table = pq.read_table(out["index"])
    rows = dict(zip(table.column("path").to_pylist(), table.column("embedding").to_pylist()))
    exported = res.embeddings.numpy()                        # the rows the run writes as its Parquet
    index = np.array([rows[p] for p in train.paths])
    assert np.abs(index - exported).max() <= 1e-5
    assert out["results"][0]["path"] == query and out["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # an index built with another pipeline is never reused: its key differs
    from grafit_core.data.pipeline import Pipeline
    from orchestrator.search import index_key
    inverted = Pipeline(1, True, "characters", 16, 32)
    assert index_key(ckpt, train.paths, ["a"], inverted) != index_key(ckpt, train.paths, ["a"],
                                                                      Pipeline(1, False, "characters", 16, 32))


def test_fine_tuning_refuses_images_read_unlike_the_trunk(trained):
    from grafit_core.errors import ConfigError
    from grafit_core.finetune import check_finetune
    folder, ckpt, _, _ = trained

    def job(options):
        cfg = config_from_dict({"data": {"name": "omniglot", "root": os.path.dirname(folder), "augment": "characters",
                                         "image_size": 16, "options": options},
                                "finetune": {"checkpoint": ckpt, "batch_size": 16}})
        return cfg, prepare_data(cfg.data)[0]

    with pytest.raises(ConfigError, match=r"trained on images read as 1 channel\(s\), inverted"):
        check_finetune(*job({"invert": False}))
    assert check_finetune(*job({})) == "character"            # read as the trunk's were
