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
import json
import os
import sys
import time

import yaml

from grafit_core.errors import GrafitError
from orchestrator.tools import cmd_evaluate, cmd_report, cmd_search, cmd_sync, cmd_ui


def parse_set(items: list[str]) -> dict:
    """`--set optim.epochs=3` -> {"optim.epochs": 3} (values parsed as YAML scalars)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise GrafitError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.epochs=3")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table; numbers as percentages like the paper's tables."""
    def cell(v):
        return f"{100 * v:.1f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r.get(c, "-"))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "-")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def cmd_local(args) -> int:
    """Train and evaluate each method in this process and print the comparison."""
    from grafit_core.config import load_config
    from grafit_core.data import prepare_data
    from grafit_core.engine import fit
    from grafit_core.methods import get_method

    overrides = parse_set(args.set)
    cfg = load_config(args.config, overrides)
    methods = args.methods.split(",") if args.methods else [cfg.method.name]
    for name in methods:
        get_method(name)                       # unknown names fail before any data is read
    start = time.time()
    train, query = prepare_data(cfg.data)
    print(f"data: {cfg.data.name} train={len(train)} query={len(query)} levels={train.hierarchy.levels} "
          f"({time.time() - start:.1f}s)", flush=True)
    rows, results = [], {}
    for name in methods:
        cfg.method.name = name
        t0 = time.time()
        res = fit(cfg, train, query, log=lambda s: print(s, flush=True))
        row = {"method": name, "train_level": cfg.data.train_level, "minutes": f"{(time.time() - t0) / 60:.1f}"}
        row.update(res.metrics)
        if res.skipped:
            row["note"] = res.skipped
        rows.append(row)
        results[name] = {"metrics": res.metrics, "history": res.history, "skipped": res.skipped}
    levels = cfg.data.test_levels or train.hierarchy.levels
    for lv in levels:
        print(f"\n== test level: {lv} (trained on {cfg.data.train_level}; kNN top-1 and mAP, %) ==")
        cols = ["method", f"k/{lv}", f"knn_top1/{lv}", f"map_cosine/{lv}", f"map_cond/{lv}", f"map_oracle/{lv}"]
        print(format_table(rows, cols))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"config": args.config, "overrides": overrides, "results": results}, f, indent=1)
        os.replace(tmp, args.output)           # atomic: a killed run never leaves half a file
        print(f"\nresults written to {args.output}")
    return 0


def check_batch(cfg, workers: int, flag: str) -> None:
    if cfg.optim.batch_size % workers:
        raise GrafitError(f"{cfg.source}: optim.batch_size: {cfg.optim.batch_size} (the global batch) "
                          f"must be divisible by {flag} {workers}")


def connect_ray(address: str | None, num_cpus: int | None):
    """Connect to the cluster at --ray-address / RAY_ADDRESS, else start a local Ray."""
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("http"):
        raise GrafitError(f"--ray-address {address}: that is a job-server URL; give the cluster address "
                          f"for ray.init (e.g. 10.0.0.1:6379 or 'auto')")
    if address:
        ray.init(address=address)
    else:
        # the dashboard hosts the state API that Ray Train's PlacementGroupCleaner needs to free
        # the workers of a trial that Tune stops early; bind it to this machine only
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")


def checked(path: str, what: str) -> int:
    """--check: everything was validated without starting Ray."""
    print(f"{path}: ok ({what}); nothing was started (--check)")
    return 0


def print_levels(metrics: dict, levels: list[str]) -> None:
    rows = [{"test level": lv, **{k.split("/")[0]: v for k, v in metrics.items() if k.endswith(f"/{lv}")}}
            for lv in levels]
    print(format_table(rows, ["test level", "k", "knn_top1", "map_cosine", "map_cond", "map_oracle"]))


def cmd_train(args) -> int:
    """Validate everything locally, then train on Ray with W workers."""
    from grafit_core.config import load_config
    from grafit_core.data import prepare_data
    from grafit_core.evaluate import check_against_data
    from grafit_core.methods import get_method

    cfg = load_config(args.config, parse_set(args.set))
    get_method(cfg.method.name)
    check_batch(cfg, args.workers, "--workers")
    if cfg.model.sync_bn and args.gpus_per_worker <= 0:
        raise GrafitError(f"{args.config}: model.sync_bn: SyncBatchNorm needs GPU workers "
                          f"(--gpus-per-worker > 0); on CPU BatchNorm statistics stay per worker")
    train, query = prepare_data(cfg.data)      # data errors surface before any cluster resource
    levels = check_against_data(cfg, train)
    from orchestrator import tracking
    from orchestrator.train import tracked_training
    fingerprint = tracking.dataset_fingerprint(train, query)
    if args.check:
        return checked(args.config, f"{cfg.method.name} on {len(train)} images, levels {', '.join(levels)}")
    uri = tracking.tracking_uri()
    tracking.check_server(uri)
    connect_ray(args.ray_address, args.num_cpus)
    result = tracked_training(cfg, uri=uri, run_name=args.name or cfg.name, fingerprint=fingerprint,
                              workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                              gpus_per_worker=args.gpus_per_worker, storage_path=args.storage_path,
                              name=args.name, max_failures=args.max_failures)
    if result.error:
        print(f"grafit: training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"\n== {cfg.name}: {cfg.method.name} trained on {cfg.data.train_level} with {args.workers} workers "
          f"({result.wall_s:.0f}s) ==")
    final = result.return_value
    if final["skipped"]:
        print(f"skipped: {final['skipped']}")
    else:
        print_levels(final["metrics"], levels)
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '-'}")
    print(f"MLflow run {result.run_id} in {uri}; compare runs with: grafit ui")
    return 0


def check_sweep_against_data(cfg, train) -> None:
    """Every swept training level and k must exist for this dataset (errors name the sweep key)."""
    from grafit_core.config import with_overrides
    from grafit_core.errors import ConfigError
    from grafit_core.evaluate import check_against_data
    src = cfg.source or "<config>"
    values = [(f"sweep.space.{k}", k, v) for k, spec in cfg.sweep.space.items()
              for kind, vals in spec.items() if kind in ("grid", "choice") for v in vals]
    values += [(f"sweep.eval_grid.{k}", k, v) for k, vals in cfg.sweep.eval_grid.items() for v in vals]
    for where, key, value in values:
        try:
            check_against_data(with_overrides(cfg, {key: value}), train)
        except ConfigError as err:
            raise ConfigError(f"{src}: {where}: value {value!r}: {str(err).split(': ', 2)[-1]}") from None


def cmd_sweep(args) -> int:
    """Validate the sweep against its data, run it on Ray Tune, print the trials."""
    from grafit_core.config import load_config
    from grafit_core.data import prepare_data
    from grafit_core.evaluate import check_against_data
    from orchestrator import sweep, tracking

    cfg = load_config(args.config, parse_set(args.set))
    if not cfg.sweep.space:
        raise GrafitError(f"{args.config}: sweep.space: empty; a sweep needs at least one training parameter "
                          f"(use grafit train for a single run)")
    check_batch(cfg, cfg.sweep.workers, "sweep.workers")
    train, query = prepare_data(cfg.data)
    levels = check_against_data(cfg, train)
    check_sweep_against_data(cfg, train)
    cfg.sweep.metric = cfg.sweep.metric or f"online_knn_top1/{levels[-1]}"
    fingerprint = tracking.dataset_fingerprint(train, query)
    if args.check:
        return checked(args.config, f"sweep over {', '.join(cfg.sweep.space)} on {len(train)} images")
    tracking.check_server(tracking.tracking_uri())
    connect_ray(args.ray_address, args.num_cpus)
    grid, parent = sweep.run_sweep(cfg, fingerprint=fingerprint, storage_path=args.storage_path, finest=levels[-1],
                                   max_failures=args.max_failures)
    params = list(cfg.sweep.space)
    keys = [f"{m}/{lv}" for lv in levels for m in ("knn_top1", "map_cosine", "map_cond")]
    rows = sweep.trial_table(grid, params, keys)
    print(f"\n== sweep {cfg.name}: {len(rows)} trials, {grid.num_errors} failed ==")
    print(format_table(rows, ["trial", "status", *params, *keys]))
    if "seed" in params:
        print("\n== mean ± std over seeds ==")
        print(format_table(sweep.over_seeds(rows, params, keys), [p for p in params if p != "seed"] + ["seeds", *keys]))
    print(f"\nMLflow parent run {parent} in {tracking.tracking_uri()}; compare the trials with: grafit ui")
    return 0 if grid.num_errors < len(rows) else 1


def cmd_matrix(args) -> int:
    """Train every method at every training level, test at every level, log the matrices."""
    from grafit_core.config import check_sweep, load_config
    from grafit_core.data import prepare_data
    from grafit_core.evaluate import check_against_data
    from grafit_core.methods import get_method
    from orchestrator import matrix, sweep, tracking

    cfg = load_config(args.config, parse_set(args.set))
    train, query = prepare_data(cfg.data)
    levels = check_against_data(cfg, train)
    cfg = matrix.matrix_sweep(cfg, train.hierarchy.levels)
    for name in cfg.matrix.methods:
        get_method(name)
    check_sweep(cfg)
    check_batch(cfg, cfg.sweep.workers, "sweep.workers")
    check_sweep_against_data(cfg, train)
    if cfg.matrix.finetune:                   # the fine-tuning column, checked before any cell trains
        from grafit_core.config import with_overrides
        from grafit_core.finetune import check_finetune
        for lv in levels:
            check_finetune(with_overrides(cfg, {"finetune.level": lv}), train)
        if cfg.finetune.batch_size % cfg.sweep.workers:
            raise GrafitError(f"{args.config}: finetune.batch_size: {cfg.finetune.batch_size} must be divisible by "
                              f"sweep.workers {cfg.sweep.workers} (matrix.finetune is on)")
    cfg.sweep.metric = cfg.sweep.metric or f"online_knn_top1/{levels[-1]}"
    cells = len(cfg.matrix.methods) * len(cfg.matrix.train_levels)
    print(f"matrix {cfg.name}: {len(cfg.matrix.methods)} methods x {len(cfg.matrix.train_levels)} training levels "
          f"= {cells} cells, tested at {', '.join(levels)}", flush=True)
    if args.check:
        return checked(args.config, f"{cells} cells on {len(train)} images")
    tracking.check_server(tracking.tracking_uri())
    connect_ray(args.ray_address, args.num_cpus)
    matrices = {}

    def after(grid, uri, parent):
        matrices.update(matrix.assemble(grid, levels))
        matrix.log_matrices(uri, parent, matrices, cfg.matrix.train_levels, levels)
        matrix.example_figures(uri, parent, grid, train, query, cfg.matrix.train_levels, levels)

    grid, parent = sweep.run_sweep(cfg, fingerprint=tracking.dataset_fingerprint(train, query), finest=levels[-1],
                                   storage_path=args.storage_path, max_failures=args.max_failures, after=after,
                                   test_levels=levels)
    for metric in matrix.METRICS:
        for method, rows in matrices.get(metric, {}).items():
            print(f"\n== {metric} (%) of {method}: rows = training level, columns = test level ==")
            print(matrix.format_matrix(rows, cfg.matrix.train_levels, levels))
    print(f"\nMLflow parent run {parent} (matrices, heatmaps, one child run per cell) in {tracking.tracking_uri()}")
    print("open it with: .venv/bin/grafit ui   (then http://127.0.0.1:5000)")
    return 0 if grid.num_errors == 0 else 1


def ray_job_parser(sub, name: str, help: str, example: str, storage: str, failures: int, storage_what: str):
    """The flags every command that runs on a Ray cluster shares."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help=f"job YAML, e.g. {example}")
    p.add_argument("--ray-address", default=None,
                   help="cluster address for ray.init (e.g. auto or HEAD:6379); default RAY_ADDRESS, "
                        "else a local Ray is started. Not the job-server URL of `grafit submit`")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--storage-path", default=storage, help=f"{storage_what} (default {storage})")
    p.add_argument("--max-failures", type=int, default=failures,
                   help=f"worker-group restarts from the latest checkpoint before giving up (default {failures})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--check", action="store_true",
                   help="validate config, flags, data and levels, then exit without starting Ray")
    return p


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

    p = ray_job_parser(sub, "train", "train on Ray Train workers (DDP, memory sharded per worker)",
                       "jobs/omniglot.yaml", "runs/ray", 1, "checkpoints; every node must reach it")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (one process each); default 2")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker; > 0 uses NCCL and CUDA (default 0: gloo on CPU)")
    p.add_argument("--name", default=None, help="run name (default: the config's name); rerunning a name resumes it")
    p.set_defaults(func=cmd_train)
    p = ray_job_parser(sub, "sweep", "run a sweep (Ray Tune over Ray Train) tracked in MLflow",
                       "jobs/sweeps/omniglot_sigma_tau.yaml", "runs/tune", 0, "Tune state and trial checkpoints")
    p.set_defaults(func=cmd_sweep)
    p = ray_job_parser(sub, "matrix", "coarse-to-fine matrices: every method at every training level",
                       "jobs/matrix/omniglot.yaml", "runs/matrix", 0, "Tune state and cell checkpoints")
    p.set_defaults(func=cmd_matrix)

    from orchestrator.finetune import add_parser as add_finetune
    add_finetune(sub, ray_job_parser)
    from orchestrator.submit import add_parsers
    add_parsers(sub)                                           # submit, jobs

    p = sub.add_parser("evaluate", help="evaluate a trained model on a nested-folder collection (JSON)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (holds train_state.pt)")
    p.add_argument("--data", required=True, help="root of nested folders: root/<level1>/.../<image>")
    p.add_argument("--levels", default=None, help="comma-separated level names, coarse -> fine (default level1,...)")
    p.add_argument("--query-fraction", type=float, default=0.25,
                   help="per leaf class, files sorted by name: the last fraction are queries (default 0.25); "
                        "a class with one file stays in the collection")
    p.add_argument("--k", default="auto", help="k of the kNN: auto (chosen on the collection) or an integer")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("search", help="rank a collection for query images with a trained model")
    p.add_argument("query", nargs="+", help="query image file(s)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (holds train_state.pt)")
    p.add_argument("--collection", required=True, help="root of nested folders: root/<level1>/.../<image>")
    p.add_argument("--levels", default=None, help="comma-separated level names, coarse -> fine (default level1,...)")
    p.add_argument("--coarse", default=None,
                   help="a class of the first (coarsest) level: its items are ranked first (eq. 5, one-hot p_c)")
    p.add_argument("--top", type=int, default=10, help="results per query (default 10)")
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
