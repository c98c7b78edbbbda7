"""Commands that use a trained model or the MLflow store, not the cluster:
`grafit evaluate`, `grafit search`, `grafit report`, `grafit ui`."""
from __future__ import annotations

import json
import os
import sys

from grafit_core.data.folders import EXTENSIONS
from grafit_core.errors import GrafitError


def folder_depth(root: str) -> int:
    """Folder levels above the images of a nested-folder collection (from its first image)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(f.lower().endswith(EXTENSIONS) for f in filenames):
            return len(os.path.relpath(dirpath, root).split(os.sep)) if dirpath != root else 0
    raise GrafitError(f"--data {root}: no image found")


def cmd_evaluate(args) -> int:
    """Evaluate a trained model on any nested-folder collection; print JSON metrics per level."""
    from grafit_core.checkpoint import load_trained
    from grafit_core.config import with_overrides
    from grafit_core.data.folders import load_folders
    from grafit_core.distributed import DistContext
    from grafit_core.engine import embed
    from grafit_core.evaluate import evaluate

    try:
        cfg, method, meta = load_trained(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise GrafitError(f"--checkpoint: {err}") from None
    if not os.path.isdir(args.data):
        raise GrafitError(f"--data {args.data}: no such folder")
    depth = folder_depth(args.data)
    levels = args.levels.split(",") if args.levels else [f"level{i + 1}" for i in range(depth)]
    if len(levels) != depth or depth == 0:
        raise GrafitError(f"--levels: {args.data} has {depth} folder level(s) above its images, got {levels}")
    pipe = meta["pipeline"]                   # the files are read as the model's training read them
    train, query = load_folders(args.data, levels=levels, query_fraction=args.query_fraction, split="sorted",
                                channels=pipe.channels, invert=pipe.invert, cache_size=pipe.decoded_size)
    # conditioning uses the coarsest level of the new taxonomy, through eq. 6 over the collection
    ecfg = with_overrides(cfg, {"data.train_level": levels[0], "data.test_levels": levels, "eval.grid": {},
                                "eval.k": args.k if args.k == "auto" else int(args.k)})
    tf = pipe.transform()
    bank, _ = embed(method, train, ecfg, DistContext(), tf)
    queries, _ = embed(method, query, ecfg, DistContext(), tf)
    metrics = evaluate(ecfg, bank, 0, train, queries, query, levels)
    out = {"checkpoint": args.checkpoint, "data": args.data, "collection": len(train), "queries": len(query),
           "levels": {lv: {k.split("/")[0]: v for k, v in metrics.items() if k.endswith(f"/{lv}")} for lv in levels}}
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
        if args.json:
            print(json.dumps(res, indent=1))
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
