"""One job preparation for every command that runs on Ray (train, sweep, matrix, finetune) and for
`grafit submit`: the flags they share, `prepare` (job file, flags against it, data and levels,
all checked before any cluster resource is taken) and `launch` (`--check`, the MLflow server, Ray).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from grafit_core.data import Collection
from grafit_core.errors import ConfigError, GrafitError
from orchestrator import tracking
from orchestrator.job import Job, Workers, blamed, load_job, matrix_sweep, parse_set

# kind: (help, example job, storage default, max_failures default, what the storage holds)
RUN_COMMANDS = {
    "train": ("train on Ray Train workers (DDP, memory sharded per worker)", "jobs/omniglot.yaml", "runs/ray", 1,
              "checkpoints; every node must reach it"),
    "sweep": ("run a sweep (Ray Tune over Ray Train) tracked in MLflow", "jobs/sweeps/omniglot_sigma_tau.yaml",
              "runs/tune", 0, "Tune state and trial checkpoints"),
    "matrix": ("coarse-to-fine matrices: every method at every training level", "jobs/matrix/omniglot.yaml",
               "runs/matrix", 0, "Tune state and cell checkpoints"),
    "finetune": ("fine-tune a checkpoint's trunk with a new FC/MLP head (paper §4.6)", "jobs/finetune/omniglot.yaml",
                 "runs/finetune", 1, "checkpoints; every node must reach it"),
}


def add_run_flags(p: argparse.ArgumentParser, kind: str) -> argparse.ArgumentParser:
    """The flags of a command that runs on a Ray cluster (also what a submit spec's options may set)."""
    _, example, storage, failures, storage_what = RUN_COMMANDS[kind]
    p.add_argument("config", help=f"job YAML, e.g. {example}")
    p.add_argument("--ray-address", default=None,
                   help="cluster address for ray.init (e.g. auto or HEAD:6379); default RAY_ADDRESS, "
                        "else a local Ray is started. Not the job-server URL of `grafit submit`")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--storage-path", default=os.environ.get("GRAFIT_STORAGE") or storage,
                   help=f"{storage_what} (default GRAFIT_STORAGE, else {storage})")
    p.add_argument("--max-failures", type=int, default=None,
                   help=f"worker-group restarts from the latest checkpoint before giving up (a lost node is one); "
                        f"default {failures}, at least {ELASTIC_FAILURES} with an elastic MIN-MAX worker range")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--check", action="store_true",
                   help="validate config, flags, data and levels, then exit without starting Ray")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output: the workers' logs, Tune's tables, Ray's internal warnings "
                        "(default: one line per epoch per run, the trials' states, the final tables)")
    if kind in ("train", "finetune"):           # sweeps and matrices size their trials in sweep.*
        default = 2 if kind == "train" else 1
        p.add_argument("--workers", type=workers_arg, default=Workers(default, default), metavar="N|MIN-MAX",
                       help=f"Ray Train workers (one process each); MIN-MAX: an elastic group that Ray sizes "
                            f"to what the cluster holds, shrinking when a node is lost and growing back "
                            f"(restarts from the latest checkpoint); default {default}")
        p.add_argument("--resize-interval-s", type=float, default=60.0,
                       help="elastic groups: how often Ray considers growing a healthy group (default 60 s)")
        p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
        p.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per worker; > 0 uses NCCL and CUDA (default 0: gloo on CPU)")
        p.add_argument("--name", default=None, help="run name (default: the config's name, <name>-finetune for "
                                                    "fine-tuning); rerunning a name resumes it")
    return p


@dataclass
class Prepared:
    """A job checked against its flags and its data, ready to run."""
    kind: str
    job: Job
    args: argparse.Namespace
    train: Collection
    query: Collection
    levels: list[str]                         # the test levels (fine-tuning: its one level)
    fingerprint: str                          # of the dataset (tracking.dataset_fingerprint)
    summary: str                              # one line for --check

    @property
    def columns(self) -> list[str]:
        """The test levels, then `<level>/unseen` for the classes data.unseen holds out of training."""
        unseen = [f"{lv}/unseen" for lv in self.levels] if self.job.config.data.unseen.active else []
        return self.levels + unseen


ELASTIC_FAILURES = 2                          # default restarts of an elastic group: a lost node is a failure to Ray


def workers_arg(text: str) -> Workers:
    try:
        return Workers.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def max_failures(args: argparse.Namespace, workers: Workers) -> int:
    """--max-failures, or its default: the command's, at least ELASTIC_FAILURES for an elastic group."""
    if args.max_failures is not None:
        return args.max_failures
    default = RUN_COMMANDS[args.command][3]
    return max(default, ELASTIC_FAILURES) if workers.elastic else default


def check_batch(batch: int, key: str, workers: Workers, flag: str, source: str) -> None:
    """The global batch is split evenly: every size an elastic group may take must divide it."""
    bad = [w for w in workers.sizes if batch % w]
    if bad:
        raise GrafitError(f"{source}: {key}: {batch} (the global batch) must be divisible by {flag} {workers}"
                          + (f": by every size Ray may pick, not by {', '.join(map(str, bad))}" if workers.elastic
                             else ""))


def check_sweep_against_data(job: Job, train) -> None:
    """Every swept training level and k must exist for this dataset (errors name the sweep key)."""
    from grafit_core.config import with_overrides
    from grafit_core.evaluate import check_against_data
    sw = job.sweep
    values = [(f"sweep.space.{k}", k, v) for k, spec in sw.space.items()
              for kind, vals in spec.items() if kind in ("grid", "choice") for v in vals]
    values += [(f"sweep.eval_grid.{k}", k, v) for k, vals in sw.eval_grid.items() for v in vals]
    for where, key, value in values:
        try:
            check_against_data(with_overrides(job.config, {key: value}), train)
        except ConfigError as err:
            raise ConfigError(f"{job.source}: {where}: value {value!r}: {str(err).split(': ', 2)[-1]}") from None


def prepare(kind: str, args: argparse.Namespace) -> Prepared:
    """Everything a command checks before any cluster resource is taken, in one place; errors name
    where the value came from (the job file, an included file, `--set`)."""
    job = load_job(args.config, parse_set(args.set))
    with blamed(job.source, job.origins):
        return _checked(kind, args, job)


def _checked(kind: str, args: argparse.Namespace, job: Job) -> Prepared:
    from grafit_core.data import prepare_data
    from grafit_core.evaluate import check_against_data
    from grafit_core.finetune import check_finetune
    from grafit_core.methods import get_method

    cfg, src = job.config, job.source
    methods = {"local": (args.methods or cfg.method.name).split(",") if kind == "local" else [],
               "matrix": job.matrix.methods}.get(kind) or [cfg.method.name]
    for name in methods:                       # unknown names fail before any data is read
        get_method(name)
    if kind == "sweep" and not job.sweep.space:
        raise GrafitError(f"{src}: sweep.space: empty; a sweep needs at least one training parameter "
                          f"(use grafit train for a single run)")
    if kind in ("train", "finetune"):
        batch, key = (cfg.optim.batch_size, "optim.batch_size") if kind == "train" else \
            (cfg.finetune.batch_size, "finetune.batch_size")
        check_batch(batch, key, args.workers, "--workers", src)
    if kind in ("sweep", "matrix"):
        check_batch(cfg.optim.batch_size, "optim.batch_size", job.sweep.worker_range, "sweep.workers", src)
    if kind == "train" and cfg.model.sync_bn and args.gpus_per_worker <= 0:
        raise GrafitError(f"{src}: model.sync_bn: SyncBatchNorm needs GPU workers "
                          f"(--gpus-per-worker > 0); on CPU BatchNorm statistics stay per worker")
    train, query = prepare_data(cfg.data, src)      # data errors surface before any cluster resource
    levels = [check_finetune(cfg, train)] if kind == "finetune" else check_against_data(cfg, train)
    summary = f"{', '.join(methods)} on {len(train)} images, levels {', '.join(levels)}"
    if kind == "matrix":
        job = matrix_sweep(job, train.hierarchy.levels)
        if job.matrix.finetune:               # the fine-tuning column, checked before any cell trains
            from grafit_core.config import with_overrides
            for lv in levels:
                check_finetune(with_overrides(job.config, {"finetune.level": lv}), train)
            check_batch(cfg.finetune.batch_size, "finetune.batch_size", job.sweep.worker_range,
                        "sweep.workers (matrix.finetune is on)", src)
        summary = f"{len(methods) * len(job.matrix.train_levels)} cells on {len(train)} images"
    if kind in ("sweep", "matrix"):
        check_sweep_against_data(job, train)
        job.sweep.metric = job.sweep.metric or f"online_knn_top1/{levels[-1]}"
    if kind == "sweep":
        summary = f"sweep over {', '.join(job.sweep.space)} on {len(train)} images"
    if kind == "finetune":
        summary = f"fine-tune {cfg.finetune.checkpoint or f'a random {cfg.model.trunk}'} on {levels[0]}, " \
                  f"{len(train)} images"
    return Prepared(kind, job, args, train, query, levels, tracking.dataset_fingerprint(train, query), summary)


def check_local_cpus(prep: Prepared) -> None:
    """A local Ray with too few CPUs would wait forever: refuse it before Ray starts or a run is made
    (a cluster's capacity is checked once connected, by workers.check_resources / sweep.check_capacity)."""
    if prep.args.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    have = prep.args.num_cpus or os.cpu_count() or 1
    if prep.kind in ("train", "finetune"):         # an elastic group needs its minimum
        need, what = prep.args.workers.min * prep.args.cpus_per_worker, \
            f"--workers {prep.args.workers} x --cpus-per-worker {prep.args.cpus_per_worker:g}"
    else:
        sw = prep.job.sweep
        need, what = sw.max_concurrent * sw.worker_range.min * sw.cpus_per_worker, \
            f"sweep.max_concurrent {sw.max_concurrent} x sweep.workers {sw.workers} x sweep.cpus_per_worker " \
            f"{sw.cpus_per_worker:g}"
    if need > have + 1e-9:
        raise GrafitError(f"{what} = {need:g} CPUs but a local Ray here has {have}"
                          f"{' (--num-cpus)' if prep.args.num_cpus else ''}; lower them, or give --ray-address "
                          f"of a cluster; nothing was started")


def check_ray_job(storage_path: str, uri: str, cwd: str | None = None) -> None:
    """Inside a Ray job (`ray job submit`, the Jobs SDK, a KubeRay RayJob) the working dir is a
    temporary copy deleted with the job: refuse a tracking store or a storage path in it."""
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return
    cwd = os.path.realpath(cwd or os.getcwd())
    local = [f"MLflow store {uri}" for path in [uri[len("sqlite:///"):]] if uri.startswith("sqlite:///")
             and os.path.commonpath([os.path.realpath(path), cwd]) == cwd]
    if "://" not in storage_path and os.path.commonpath([os.path.realpath(storage_path), cwd]) == cwd:
        local.append(f"storage {storage_path}")
    if local:
        raise GrafitError(f"inside a Ray job, {' and '.join(local)} would be written to the job's temporary working "
                          f"dir {cwd} and deleted with it: start the cluster's nodes with MLFLOW_TRACKING_URI and "
                          f"GRAFIT_STORAGE (cluster/local.sh does), or set them in the job's env_vars; "
                          f"nothing was started")


def launch(prep: Prepared) -> bool:
    """--check: say so and stop (False). Else refuse an MLflow server that does not answer, then
    connect to the cluster (or start a local Ray)."""
    check_ray_job(prep.args.storage_path, tracking.tracking_uri())
    check_local_cpus(prep)
    if prep.args.check:
        print(f"{prep.args.config}: ok ({prep.summary}); nothing was started (--check)")
        return False
    tracking.check_server(tracking.tracking_uri())
    connect_ray(prep.args.ray_address, prep.args.num_cpus, getattr(prep.args, "verbose", False))
    return True


def connect_ray(address: str | None, num_cpus: int | None, verbose: bool = False) -> None:
    """Connect to the cluster at --ray-address / RAY_ADDRESS, else start a local Ray. Without
    --verbose the workers' output stays in Ray's log files (the driver prints one line per epoch
    from the runs' journals and Tune's events): no internal warnings, no duplicated lines."""
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("http"):
        raise GrafitError(f"--ray-address {address}: that is a job-server URL; give the cluster address "
                          f"for ray.init (e.g. 10.0.0.1:6379 or 'auto')")
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    if not verbose:                           # MLflow reads it when first imported (its store's INFO lines)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if address:
        ray.init(address=address, **quiet)
    else:
        # the dashboard hosts the state API that Ray Train's PlacementGroupCleaner needs to free
        # the workers of a trial that Tune stops early; bind it to this machine only
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **quiet)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """The same table in Markdown (MLflow renders a run's description as Markdown)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |" for r in rows])


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table; numbers as percentages like the paper's tables."""
    def cell(v):
        return f"{100 * v:.1f}" if isinstance(v, float) else str(v)
    widths = [max([len(c), *(len(cell(r.get(c, "-"))) for r in rows)]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "-")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)
