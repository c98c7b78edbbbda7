"""Commands that use a trained model or the MLflow store, not the cluster:
`grafit evaluate`, `grafit search`, `grafit report`, `grafit ui`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from grafit_core.data.folders import EXTENSIONS
from grafit_core.errors import GrafitError


def k_arg(text: str):
    """--k: auto or an integer >= 1 (argparse types: a bad value is one usage line)."""
    return text if text == "auto" else positive_int(text, "auto or an integer >= 1")


def fraction(text: str) -> float:
    """--query-fraction: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def positive_int(text: str, expected: str = "an integer >= 1") -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return int(text)


def folder_depth(root: str) -> int:
    """Folder levels above the images of a nested-folder collection (from its first image)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(f.lower().endswith(EXTENSIONS) for f in filenames):
            return len(os.path.relpath(dirpath, root).split(os.sep)) if dirpath != root else 0
    raise GrafitError(f"--data {root}: no image found")


def training_folder(cfg) -> str | None:
    """The image folder the model's training read (nested-folder datasets), else None."""
    from grafit_core.data.folders import find_omniglot
    if cfg.data.name == "folders":
        return cfg.data.root
    return find_omniglot(cfg.data.root) if cfg.data.name == "omniglot" and cfg.data.root else None


def evaluation_split(args, cfg, pipe) -> tuple:
    """(collection, queries, levels, conditioning level, split) of --data. The folder the model was
    trained on is split as its training split it (its queries are then never training images); any
    other folder by name, the last --query-fraction of each leaf class being queries."""
    from grafit_core.data import load_dataset
    from grafit_core.data.folders import load_folders
    own = training_folder(cfg)
    here, there = os.path.realpath(args.data), os.path.realpath(own) if own else None
    if there and here != there and (there.startswith(here + os.sep) or here.startswith(there + os.sep)):
        raise GrafitError(f"--data {args.data}: overlaps {own}, the folder the model was trained on: give that "
                          f"folder itself (its held-out queries) or one apart from it")
    if here == there:
        if args.query_fraction is not None:
            raise GrafitError(f"--query-fraction: {args.data} is the folder the model was trained on; its queries "
                              f"are the ones its training held out (data.options in the checkpoint): drop the flag")
        # the training's own loader and options: its split, its files read as the training read them
        train, query = load_dataset(cfg.data.name, cfg.data.root, cfg.data.options)
        levels = train.hierarchy.levels
        if args.levels and args.levels.split(",") != levels:
            raise GrafitError(f"--levels: {args.data} is the folder the model was trained on, with levels "
                              f"{','.join(levels)}")
        return train, query, levels, cfg.data.train_level if cfg.data.train_level in levels else levels[0], "training's"
    depth = folder_depth(args.data)
    levels = args.levels.split(",") if args.levels else [f"level{i + 1}" for i in range(depth)]
    if len(levels) != depth or depth == 0:
        raise GrafitError(f"--levels: {args.data} has {depth} folder level(s) above its images, got {levels}")
    part = 0.25 if args.query_fraction is None else args.query_fraction
    train, query = load_folders(args.data, levels=levels, query_fraction=part, split="sorted",
                                channels=pipe.channels, invert=pipe.invert, cache_size=pipe.decoded_size)
    return train, query, levels, levels[0], f"sorted, last {part:g} of each class"


def cmd_evaluate(args) -> int:
    """Evaluate a trained model on any nested-folder collection; print JSON metrics per level."""
    from grafit_core.config import with_overrides
    from grafit_core.distributed import DistContext
    from grafit_core.engine import embed
    from grafit_core.evaluate import evaluate
    from orchestrator.matrix import meaningful
    from orchestrator.search import open_model

    cfg, method, meta = open_model(args.checkpoint)
    if not os.path.isdir(args.data):
        raise GrafitError(f"--data {args.data}: no such folder")
    pipe = meta["pipeline"]                   # the files are read as the model's training read them
    train, query, levels, by, split = evaluation_split(args, cfg, pipe)
    if len(query) == 0:
        raise GrafitError(f"--data {args.data}: no query image (every leaf class has one file, or "
                          f"--query-fraction is 0): nothing to evaluate")
    # conditioning (eq. 6, a kNN vote over the collection) at the training level on the training
    # folder, else at the coarsest level of the new taxonomy
    ecfg = with_overrides(cfg, {"data.train_level": by, "data.test_levels": levels, "eval.grid": {},
                                "eval.k": args.k})
    tf = pipe.transform()
    bank, _ = embed(method, train, ecfg, DistContext(), tf)
    queries, _ = embed(method, query, ecfg, DistContext(), tf)
    metrics = evaluate(ecfg, bank, 0, train, queries, query, levels)
    # conditioned and oracle mAP at or above the conditioning level are not results (1.0 by construction)
    out = {"checkpoint": args.checkpoint, "trained": meta["trained"], "data": args.data, "split": split,
           "conditioned_on": by, "collection": len(train), "queries": len(query),
           "levels": {lv: {k.split("/")[0]: v for k, v in metrics.items()
                           if k.endswith(f"/{lv}") and meaningful(k.split("/")[0], by, lv, levels)}
                      for lv in levels}}
    print(json.dumps(out, indent=1))
    return 0


def cmd_search(args) -> int:
    """Rank a collection for query images; optionally conditioned on a coarse class."""
    from orchestrator.search import search
    if not os.path.isdir(args.collection):
        raise GrafitError(f"--collection {args.collection}: no such folder")
    if not args.levels:
        depth = folder_depth(args.collection)
        args.levels = ",".join(f"level{i + 1}" for i in range(depth))
    for res in search(args):
        if args.json:                         # one object per line: several queries stay parseable
            print(json.dumps(res))
            continue
        how = f"conditioned on {args.coarse!r}" if args.coarse else "cosine"
        print(f"{res['query']} ({how}; index {res['index']}{', built' if res['index_built'] else ''}):")
        for r in res["results"]:
            print(f"  {r['rank']:3d}  {r['score']:8.4f}  {r['path']}")
    return 0


def cmd_report(args) -> int:
    """Rebuild the tables and figures of a run or experiment from MLflow."""
    from orchestrator import tracking
    from orchestrator.report import report
    uri = args.backend_store_uri or tracking.tracking_uri()
    report(uri, args.run, args.out or os.path.join("runs", "report", args.run))
    return 0


def cmd_ui(args) -> int:
    """Start the MLflow UI on 127.0.0.1 over the project's tracking store."""
    from orchestrator import tracking
    uri = args.backend_store_uri or tracking.tracking_uri()
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port}/#/?workflowType=machine_learning "
          f"(Ctrl-C to stop)", flush=True)
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    # one server process: with several, uvicorn's supervisor restarts a worker that misses its health
    # check while still starting (a loaded machine here: "Child process died" in a loop, never up)
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
                      "--workers", "1"])


def cmd_sync(args) -> int:
    """Send the MLflow records a run kept locally while its tracking server was away."""
    from orchestrator import journal
    pending = journal.unsent(args.dir)
    if not pending:
        print(f"{args.dir}: nothing to send")
        return 0
    if not journal.replay_all(args.dir, args.wait):
        raise GrafitError(f"{args.dir}: the MLflow server still does not answer after {args.wait:.0f} s; "
                          f"nothing was lost, run grafit sync again later")
    print("\n".join(f"sent {p}" for p in pending))
    return 0
