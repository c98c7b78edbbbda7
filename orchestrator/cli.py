"""The `grafit` command line.

    grafit local jobs/omniglot.yaml --methods grafit,ce     # one process, no Ray, no MLflow
    grafit train jobs/omniglot.yaml --workers 2             # Ray Train, memory sharded per worker
    grafit sweep jobs/sweeps/omniglot_sigma_tau.yaml        # Ray Tune over Train, MLflow parent/child runs
    grafit matrix jobs/matrix/omniglot.yaml                 # coarse-to-fine matrices, heatmaps in MLflow
    grafit finetune jobs/finetune/omniglot.yaml             # a checkpoint's trunk + new head (paper 4.6)
    grafit ui                                               # the MLflow UI on 127.0.0.1
    grafit submit jobs/submit/omniglot_train.yaml           # validate here, run on a Ray cluster
"""
from __future__ import annotations

import argparse
import sys

from grafit_core.errors import GrafitError
from orchestrator.matrix import cmd_matrix
from orchestrator.prepare import RUN_COMMANDS, add_run_flags
from orchestrator.submit import add_parsers as add_submit_parsers
from orchestrator.sweep import cmd_sweep
from orchestrator.tools import (cmd_evaluate, cmd_report, cmd_search, cmd_sync, cmd_ui, fraction, k_arg,
                                positive_int)
from orchestrator.train import cmd_finetune, cmd_local, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grafit", description="Grafit experiments: train, evaluate, compare.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("local", help="train and evaluate in this process (no Ray, no MLflow)")
    p.add_argument("config", help="job YAML, e.g. jobs/omniglot.yaml")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to compare, e.g. grafit,ce (default: the config's method.name)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.epochs=3 (repeatable)")
    p.add_argument("--output", default=None, help="write metrics and per-epoch history to this JSON file")
    p.set_defaults(func=cmd_local)

    for kind, command in (("train", cmd_train), ("sweep", cmd_sweep), ("matrix", cmd_matrix),
                          ("finetune", cmd_finetune)):
        add_run_flags(sub.add_parser(kind, help=RUN_COMMANDS[kind][0]), kind).set_defaults(func=command)
    add_submit_parsers(sub)                                    # submit, jobs

    p = sub.add_parser("evaluate", help="evaluate a trained model on a nested-folder collection (JSON)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (holds train_state.pt)")
    p.add_argument("--data", required=True, help="root of nested folders: root/<level1>/.../<image>")
    p.add_argument("--levels", default=None, help="comma-separated level names, coarse -> fine (default level1,...)")
    p.add_argument("--query-fraction", type=fraction, default=None,
                   help="per leaf class, files sorted by name: the last fraction are queries (default 0.25); "
                        "a class with one file stays in the collection. Not on the folder the model was trained "
                        "on: its queries are the ones its training held out")
    p.add_argument("--k", default="auto", type=k_arg,
                   help="k of the kNN: auto (chosen on the collection, per level) or an integer >= 1")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("search", help="rank a collection for query images with a trained model")
    p.add_argument("query", nargs="+", help="query image file(s)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (holds train_state.pt)")
    p.add_argument("--collection", required=True, help="root of nested folders: root/<level1>/.../<image>")
    p.add_argument("--levels", default=None, help="comma-separated level names, coarse -> fine (default level1,...)")
    p.add_argument("--coarse", default=None,
                   help="a class of the first (coarsest) level: its items are ranked first (eq. 5, one-hot p_c)")
    p.add_argument("--top", type=positive_int, default=10, help="results per query (default 10)")
    p.add_argument("--index-dir", default="runs/index",
                   help="where the collection's Parquet index is kept and reused (default runs/index)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    p.add_argument("--backend", choices=["torch", "faiss"], default="torch",
                   help="torch: exact scores of every item (default); faiss: faiss-cpu flat search for the top")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="rebuild tables and figures of a run or experiment from MLflow")
    p.add_argument("run", help="an MLflow run id, or an experiment name (its latest top-level run)")
    p.add_argument("--out", default=None, help="folder for figures and CSVs (default runs/report/<run>)")
    p.add_argument("--backend-store-uri", default=None,
                   help="tracking store (default MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sync", help="send the MLflow records a run kept while its server was unreachable")
    p.add_argument("dir", help="the run's journal folder (printed by the run: <storage>/<name>/mlflow_journal)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to keep retrying (default 60)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("ui", help="start the MLflow UI (bound to 127.0.0.1 unless --host says otherwise)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--backend-store-uri", default=None,
                   help="tracking store (default MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GrafitError as err:                 # bad input: one clear line, no traceback
        print(f"grafit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
