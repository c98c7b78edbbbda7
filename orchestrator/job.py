"""A job file: one YAML schema, read into the core's Config plus the sections only the orchestrator
reads (sweep, matrix, tracking). Errors name the file and the key, as the core's do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from grafit_core.config import (Config, config_from_dict, config_from_file, from_dict, read_yaml, set_dotted,
                                to_dict, with_overrides)
from grafit_core.errors import ConfigError, GrafitError


@dataclass
class SweepConfig:
    """A search over training parameters (Ray Tune) plus a grid of evaluation-only values that
    every trial evaluates from its one set of embeddings (they never retrain)."""
    space: dict = field(default_factory=dict)      # "method.sigma": {grid|choice: [...]} or {uniform|loguniform: [a,b]}
    eval_grid: dict = field(default_factory=dict)  # "eval.k": [auto, 10, 20] (becomes the core's eval.grid)
    metric: Optional[str] = None              # ASHA's metric; default online_knn_top1/<finest test level>
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1                     # ASHA: epochs before a trial can be stopped
    search: Literal["random", "tpe"] = "random"   # random: Tune's grid + random variant generator;
                                              # tpe: Optuna's TPE (no grid), seeded with the job's seed
    num_samples: int = 1                      # random: repeats of the grid (random draws for distributions);
                                              # tpe: configurations
    seeds: int = 1                            # replicates of each configuration, seeds seed, seed + 1, ...
    max_concurrent: int = 1
    workers: Union[int, str] = 1              # Ray Train workers per trial: N, or MIN-MAX (elastic, see Workers)
    resize_interval_s: float = 60.0           # elastic: how often Ray considers resizing a healthy group
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    @property
    def worker_range(self) -> "Workers":
        return Workers.parse(self.workers)


@dataclass(frozen=True)
class Workers:
    """A worker count `N`, or an elastic range `MIN-MAX`: Ray Train V2 starts the group at the size the
    cluster can hold, restarts it smaller when a node is lost and larger when nodes come back (from
    the latest checkpoint; the memory is resharded by global index range), never below MIN."""
    min: int
    max: int

    @classmethod
    def parse(cls, value) -> "Workers":
        text = str(value).strip()
        lo, _, hi = text.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not _)) or int(lo) < 1 or int(hi or lo) < int(lo):
            raise ValueError(f"expected N or MIN-MAX with 1 <= MIN <= MAX, got {value!r}")
        return cls(int(lo), int(hi or lo))

    @property
    def elastic(self) -> bool:
        return self.max > self.min

    @property
    def sizes(self) -> range:
        return range(self.min, self.max + 1)

    def scaling(self):
        """ScalingConfig's num_workers: an int, or the (min, max) tuple of an elastic group."""
        return (self.min, self.max) if self.elastic else self.min

    def __str__(self) -> str:
        return f"{self.min}-{self.max}" if self.elastic else str(self.min)


@dataclass
class MatrixConfig:
    """Coarse-to-fine matrices (paper Tables 3-4): train each method at each level, test at every level."""
    methods: list[str] = field(default_factory=list)       # default: [method.name]
    train_levels: list[str] = field(default_factory=list)  # default: none + every level of the dataset
    finetune: bool = False                    # a fine-tuning column: each cell's trunk fine-tuned at every
                                              # test level with the job's finetune section (paper Table 6)


@dataclass
class TrackingConfig:
    experiment: Optional[str] = None          # MLflow experiment; default: the job's name
    embeddings_max_mb: float = 256.0          # log the collection's embeddings as Parquet up to this size
    log_checkpoint: bool = True               # log the final checkpoint as an artifact
    offline_wait_s: float = 600.0             # after training, how long to wait for an unreachable server


@dataclass
class Job:
    config: Config
    sweep: SweepConfig = field(default_factory=SweepConfig)
    matrix: MatrixConfig = field(default_factory=MatrixConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    origins: dict = field(default_factory=dict, repr=False)   # dotted key -> its file or `--set` (load_job)

    @property
    def source(self) -> str:
        return self.config.source or "<config>"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.config.name


SECTIONS = {"sweep": SweepConfig, "matrix": MatrixConfig, "tracking": TrackingConfig}
EVAL_ONLY = ("eval.k", "eval.sigma", "eval.k_candidates", "eval.knn_backend")   # change nothing in training
NOT_SWEPT = ("name", "data.test_levels", "data.name", "data.root", "eval.grid")
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")


def parse_set(items: list[str] | None) -> dict:
    """`--set optim.epochs=3` -> {"optim.epochs": 3} (values parsed as YAML scalars)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise GrafitError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.epochs=3")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_job(path: str, overrides: dict | None = None, set_where: str = "--set ") -> Job:
    """Read a job file (includes merged), apply dotted overrides, validate every section; an error
    names where the faulty value came from (the file, an included file, or `--set`)."""
    origins: dict = {}
    data = read_yaml(path, origins=origins)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
        origins.update({k: SET for k in origins if k.startswith(dotted + ".")}, **{dotted: SET})
    with blamed(path, origins, set_where=set_where):
        job = job_from_dict(data, path, from_file=True)
    job.origins = origins
    return job


SET = "--set"


@contextlib.contextmanager
def blamed(path: str, origins: dict, shown: str | None = None, set_where: str = SET + " "):
    """A ConfigError `path: key: why` about a key that came from `--set` or from an included file
    says so: `--set key: why`, `base.yaml (included by path): key: why`. shown: the name to give
    `path` (the job file a resolved copy was made from); set_where: how to name an override."""
    try:
        yield
    except ConfigError as err:
        text = str(err)
        if not text.startswith(path + ": "):
            raise
        key = text[len(path) + 2:].split(": ", 1)[0]
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        origin = next((origins[p] for p in prefixes if p in origins),
                      next((o for k, o in origins.items() if k.startswith(key + ".")), path))
        main = shown or path
        where = set_where if origin == SET else f"{main}: " if origin in (path, main) else \
            f"{origin} (included by {main}): "
        if where == f"{path}: ":
            raise
        raise ConfigError(where + text[len(path) + 2:]) from None


def job_from_dict(data: dict, source: str, from_file: bool = False) -> Job:
    data = dict(data)
    if "grid" in (data.get("eval") or {}) and from_file:
        raise ConfigError(f"{source}: eval.grid: set by sweep.eval_grid")
    parts = {name: from_dict(cls, data.pop(name, None) or {}, name, source) for name, cls in SECTIONS.items()}
    data["eval"] = {**(data.get("eval") or {}), "grid": parts["sweep"].eval_grid}
    cfg = config_from_file(data, source) if from_file else config_from_dict(data, source)
    job = Job(cfg, **parts)
    check_sweep(job)
    return job


def job_dict(job: Job) -> dict:
    """The job as the one schema's plain data (MLflow params, trials): the core's keys + sections."""
    out = to_dict(job.config)
    out["eval"] = {k: v for k, v in out["eval"].items() if k != "grid"}
    return {**out, **{name: dataclasses.asdict(getattr(job, name)) for name in SECTIONS}}


def job_with(job: Job, overrides: dict) -> Job:
    """A copy with dotted keys replaced (core keys or sections), validated like a file."""
    data = job_dict(job)
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    return job_from_dict(data, job.source)


def _field_exists(dotted: str) -> bool:
    cls = Config
    for part in dotted.split("."):
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in fields:
            return False
        cls = typing.get_type_hints(cls)[part]
    return not dataclasses.is_dataclass(cls)


def check_sweep(job: Job) -> None:
    """Every swept value must make a valid config; eval-only keys belong in eval_grid."""
    sw = job.sweep

    def bad(key, msg):
        raise ConfigError(f"{job.source}: {key}: {msg}")

    def check_value(where, key, value):
        try:
            with_overrides(job.config, {key: value})
        except ConfigError as err:
            bad(where, f"value {value!r}: {str(err).split(': ', 1)[-1]}")

    for key, spec in sw.space.items():
        where = f"sweep.space.{key}"
        if key in EVAL_ONLY:
            bad(where, "evaluation-only (changes nothing in training): put it in sweep.eval_grid")
        if key in NOT_SWEPT or not _field_exists(key):
            bad(where, "not a parameter that can be swept")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            bad(where, f"expected one of {{{', '.join(k + ': ...' for k in SPACE_KINDS)}}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                bad(f"{where}.{kind}", "expected a non-empty list of values")
        elif (not isinstance(values, list) or len(values) != 2
              or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
              or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0)):
            bad(f"{where}.{kind}",
                f"expected [low, high] with low < high{' and low > 0' if kind == 'loguniform' else ''}")
        for value in values:                     # grid values, or the bounds of a distribution
            check_value(f"{where}.{kind}", key, value)
    for key, values in sw.eval_grid.items():
        where = f"sweep.eval_grid.{key}"
        if key not in EVAL_ONLY:
            bad(where, f"only evaluation-only keys ({', '.join(EVAL_ONLY)}) go here; "
                       f"sweep training keys in sweep.space")
        if not isinstance(values, list) or not values:
            bad(where, "expected a non-empty list of values")
        for value in values:
            check_value(where, key, value)
    try:
        Workers.parse(sw.workers)
    except ValueError as err:
        bad("sweep.workers", str(err))
    for key, value, low in (("sweep.num_samples", sw.num_samples, 1), ("sweep.max_concurrent", sw.max_concurrent, 1),
                            ("sweep.grace_period", sw.grace_period, 1), ("sweep.seeds", sw.seeds, 1),
                            ("sweep.resize_interval_s", sw.resize_interval_s, 0)):
        if value < low:
            bad(key, f"must be >= {low}, got {value}")
    check_search(job, bad)


def check_search(job: Job, bad) -> None:
    """What Optuna's TPE and replicates (sweep.seeds) can take, said before Ray starts."""
    sw = job.sweep
    if "seed" in sw.space and (sw.search == "tpe" or sw.seeds > 1):
        bad("sweep.space.seed", "replicates come from sweep.seeds (seeds seed, seed + 1, ...): remove seed from the "
                                "space" + (" (TPE would treat the seed as a parameter to tune)" if sw.search == "tpe"
                                           else ""))
    if sw.seeds > 1 and sw.scheduler == "asha":
        # Tune's Repeater advises against an early-stopping scheduler: ASHA would stop some replicates
        # of a configuration and not others, so its mean over seeds would be over the lucky ones
        bad("sweep.seeds", f"{sw.seeds} replicates need scheduler: fifo (ASHA stops replicates one by one)")
    if sw.search != "tpe":
        if sw.num_samples > 1 and sw.space and all("grid" in spec for spec in sw.space.values()):
            # a trial is named by its configuration: a repeated grid would be the same trials again
            bad("sweep.num_samples", f"{sw.num_samples} repeats of a grid train the same configurations; "
                                     f"for replicates use sweep.seeds")
        return
    for key, spec in sw.space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            bad(f"sweep.space.{key}.grid", "search: tpe samples, it cannot enumerate a grid (Optuna refuses one): "
                                           "use choice: [...] or uniform/loguniform: [low, high], or search: random")
        if kind == "choice" and not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            bad(f"sweep.space.{key}.choice",
                f"search: tpe takes choices of None, bool, int, float or str, got {values!r}")
    if not sw.space:
        bad("sweep.space", "search: tpe needs at least one parameter to sample (choice, uniform or loguniform)")


def objective_metric(levels: list[str]) -> str:
    """A sweep's objective (TPE's target, the best): final kNN top-1 at the finest test level, higher is better."""
    return f"knn_top1/{levels[-1]}"


def matrix_sweep(job: Job, levels: list[str]) -> Job:
    """The sweep that runs every cell of a matrix: a FIFO grid over methods x training levels."""
    for key, value, ok in (("sweep.search", job.sweep.search, "random"), ("sweep.seeds", job.sweep.seeds, 1)):
        if value != ok:                       # a cell is one training run, every cell is run
            raise ConfigError(f"{job.source}: {key}: {value!r}: a matrix runs every cell once ({key}: {ok}); "
                              f"run it once per seed for replicates")
    methods = job.matrix.methods or [job.config.method.name]
    train_levels = job.matrix.train_levels or ["none", *levels]
    space = {"method.name": {"grid": methods}, "data.train_level": {"grid": train_levels}}
    return job_with(job, {"sweep.space": space, "sweep.scheduler": "fifo",
                          "matrix.methods": methods, "matrix.train_levels": train_levels})
