"""The core's typed configuration (data, model, method, optim, eval, finetune): YAML -> validated
dataclasses. A job file's orchestrator sections (sweep, matrix, tracking) are typed in orchestrator/job.py.

Unknown keys, wrong types and out-of-range values raise ConfigError naming the file and
the key (e.g. `jobs/x.yaml: method.sigma: must be > 0, got 0`). Checks that need the
dataset (level names, k versus the collection size) are in `check_against_data`.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from grafit_core.errors import ConfigError


@dataclass
class UnseenConfig:
    """Whole coarse classes held out of training: their collection and queries (the dataset's own split)
    are evaluated apart, at every test level (`knn_top1/<level>/unseen`, grafit_core.data.hold_out)."""
    level: Optional[str] = None               # the level whose classes are held out; default the coarsest
    classes: list[str] = field(default_factory=list)   # held out by name, or ...
    fraction: float = 0.0                     # ... this fraction of the level's classes, drawn with `seed`
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(self.classes) or self.fraction > 0


@dataclass
class DataConfig:
    name: str = "synthetic"                   # a key of grafit_core.data.DATASETS
    root: Optional[str] = None                # relative paths are relative to the config file
    options: dict = field(default_factory=dict)  # keyword options of the dataset's loader
    train_level: str = "none"                 # the (coarse) labels training sees; `none` = unsupervised
    test_levels: Optional[list[str]] = None   # default: every level of the dataset
    augment: str = "natural"                  # transform preset, see grafit_core.data.transforms
    image_size: int = 32
    num_views: int = 2                        # T of eq. 1
    check_images: Literal["raise", "skip"] = "raise"   # what the up-front image check does
    check_sample: Optional[int] = None        # a seeded sample of this many images per collection (null: all)
    num_workers: int = 0                      # DataLoader worker processes
    unseen: UnseenConfig = field(default_factory=UnseenConfig)   # coarse classes never trained on


@dataclass
class ModelConfig:
    trunk: str = "resnet18"
    small_stem: bool = False                  # 3x3 stride-1 stem, no max-pool (32-64 px inputs)
    width: int = 64                           # conv4 trunk only
    projector: Optional[Literal["mlp", "linear", "none"]] = None   # default from the method
    embed_dim: int = 128                      # d: size of g(x) and of memory rows
    hidden_dim: int = 1024                    # hidden width of projector / predictor MLPs
    sync_bn: bool = False                     # SyncBatchNorm across workers (GPU runs only)


@dataclass
class MethodConfig:
    name: str = "grafit"                      # a key of grafit_core.methods.METHODS
    w_knn: Optional[float] = None             # loss weights; defaults from the method
    w_inst: Optional[float] = None
    w_ce: Optional[float] = None
    sigma: float = 0.05                       # temperature of eq. 2 (SNCA's value)
    tau_base: float = 0.99                    # EMA decay at step 0 (eq. 1's target network)
    tau_schedule: Literal["cosine", "constant"] = "cosine"   # cosine: BYOL's tau_base -> 1
    memory_renormalize: bool = True           # m <- normalize((m+z)/2); false: paper's literal (m+z)/2
    memory_dtype: Literal["fp32", "bf16"] = "fp32"   # how the memory's rows are stored (bf16: half the bytes)
    clusters: int = 100                       # ClusterFit+: k-means clusters
    label_smoothing: float = 0.0


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 256                     # global batch, across all workers
    base_lr: float = 0.1                      # lr = base_lr * batch_size / 256 (Goyal et al.)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: the networks under autocast; the kNN loss's
                                              # log-sum-exps and the memory update stay fp32


@dataclass
class CheckpointConfig:
    every_steps: int = 0                      # also checkpoint every N global batches inside an epoch (0: off)
    preemption_probe_steps: int = 20          # on Ray: ask every N batches whether a node is about to be preempted
                                              # (a barrier of all workers, ~60 ms here), checkpoint at once if so


@dataclass
class EvalConfig:
    k: Union[int, str] = "auto"               # auto: chosen on the validation subset
    k_candidates: list[int] = field(default_factory=lambda: [10, 15, 20, 25, 30])
    sigma: Optional[float] = None             # voting temperature of eq. 6; default: method.sigma
    val_size: int = 1000                      # fixed validation subset of the training collection
    batch_size: int = 512
    knn_backend: Literal["torch", "faiss"] = "torch"   # torch: exact, the reference; faiss: faiss-cpu IndexFlatIP
    grid: dict = field(default_factory=dict)  # evaluation-only variants, e.g. {"eval.k": [10, 20]}: each is
                                              # evaluated from the same embeddings (a job's sweep.eval_grid)


@dataclass
class FinetuneConfig:
    """A `grafit finetune` job (paper §4.6): the target task is the job's `data` section."""
    checkpoint: Optional[str] = None          # a grafit checkpoint dir (relative to this file); None: random trunk
    head: Literal["fc", "mlp"] = "fc"         # mlp: Linear-BN-ReLU-Linear
    level: Optional[str] = None               # the labels fine-tuned on; default the finest level
    epochs: int = 10
    batch_size: int = 256
    base_lr: float = 0.01                     # the paper's; cosine schedule to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    hidden_dim: int = 1024                    # MLP head's hidden width


@dataclass
class Config:
    name: str = "grafit"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    source: Optional[str] = None              # the file it was read from (set by load_config)

    @property
    def lr(self) -> float:
        return self.optim.base_lr * self.optim.batch_size / 256

    @property
    def eval_sigma(self) -> float:
        return self.eval.sigma if self.eval.sigma is not None else self.method.sigma


# ====== dict -> dataclass with type checks ======
def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:                     # enumerations are said once, in the field's type
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_dict(cls, data: dict, where: str, source: str):
    """Build dataclass `cls` from `data`, raising ConfigError '<source>: <where>.<key>: ...'."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{source}: {path}: unknown key; allowed: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, path, source)
        elif not _type_ok(value, hint):
            raise ConfigError(f"{source}: {path}: expected {_type_name(hint)}, got {value!r}")
        else:
            kwargs[key] = float(value) if hint in (float, Optional[float]) and value is not None else value
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Range checks that need no dataset. Raises ConfigError naming the key."""
    src = cfg.source or "<config>"

    def bad(key, msg):
        raise ConfigError(f"{src}: {key}: {msg}")

    m, o, e, d = cfg.method, cfg.optim, cfg.eval, cfg.data
    if m.sigma <= 0:
        bad("method.sigma", f"must be > 0, got {m.sigma}")
    if not 0.0 <= m.tau_base < 1.0:         # tau = 1 would freeze the target network at its init
        bad("method.tau_base", f"must be in [0, 1), got {m.tau_base}")
    for key in ("w_knn", "w_inst", "w_ce"):
        if getattr(m, key) is not None and getattr(m, key) < 0:
            bad(f"method.{key}", "must be >= 0")
    if e.sigma is not None and e.sigma <= 0:
        bad("eval.sigma", f"must be > 0, got {e.sigma}")
    if isinstance(e.k, str) and e.k != "auto":
        bad("eval.k", f"must be 'auto' or an integer >= 1, got {e.k!r}")
    if isinstance(e.k, int) and e.k < 1:
        bad("eval.k", f"must be >= 1, got {e.k}")
    if not e.k_candidates or min(e.k_candidates) < 1:
        bad("eval.k_candidates", "must be a non-empty list of integers >= 1")
    ft = cfg.finetune
    for key, value, low in (("finetune.epochs", ft.epochs, 1), ("finetune.batch_size", ft.batch_size, 2),
                            ("finetune.hidden_dim", ft.hidden_dim, 1)):
        if value < low:
            bad(key, f"must be >= {low}, got {value}")
    if ft.base_lr <= 0:
        bad("finetune.base_lr", f"must be > 0, got {ft.base_lr}")
    for key, value in (("finetune.momentum", ft.momentum), ("finetune.weight_decay", ft.weight_decay)):
        if value < 0:
            bad(key, f"must be >= 0, got {value}")
    if not 0 <= ft.warmup_epochs < ft.epochs:
        bad("finetune.warmup_epochs", f"must be in [0, finetune.epochs = {ft.epochs}), got {ft.warmup_epochs}")
    if d.unseen.classes and d.unseen.fraction:
        bad("data.unseen", "give classes or fraction, not both")
    if not 0 <= d.unseen.fraction < 1:
        bad("data.unseen.fraction", f"must be in [0, 1), got {d.unseen.fraction}")
    if d.check_sample is not None and d.check_sample < 1:
        bad("data.check_sample", f"must be >= 1 (null: check every image), got {d.check_sample}")
    if d.check_sample is not None and d.check_images == "skip":   # a sample would leave bad ones in silently
        bad("data.check_sample", "data.check_images: skip needs every image checked; remove data.check_sample")
    for key, value, low in (("optim.epochs", o.epochs, 1), ("optim.batch_size", o.batch_size, 2),
                            ("data.num_views", d.num_views, 1), ("data.image_size", d.image_size, 8),
                            ("model.embed_dim", cfg.model.embed_dim, 1), ("eval.val_size", e.val_size, 1)):
        if value < low:
            bad(key, f"must be >= {low}, got {value}")
    if o.base_lr <= 0:
        bad("optim.base_lr", f"must be > 0, got {o.base_lr}")
    for key in ("every_steps", "preemption_probe_steps"):
        if getattr(cfg.checkpoint, key) < 0:
            bad(f"checkpoint.{key}", f"must be >= 0 (0: off), got {getattr(cfg.checkpoint, key)}")
    return cfg


def set_dotted(data: dict, dotted: str, value) -> None:
    """data["a"]["b"] = value for "a.b" (a missing section is created; validation names it)."""
    *parents, last = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[last] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str, _seen: tuple = (), origins: Optional[dict] = None) -> dict:
    """Safe-load a YAML mapping; `include: other.yaml` (relative to this file) supplies defaults
    that this file's keys override, so a variant is a few lines on top of a base job. origins:
    filled with {dotted key: the file it came from}, so that an error can name that file."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level: expected a mapping, got {type(data).__name__}")
    include = data.pop("include", None)
    if include is None:
        if origins is not None:
            origins.update(dict.fromkeys(flatten_dict(data), path))
        return data
    if not isinstance(include, str):
        raise ConfigError(f"{path}: include: expected a file name, got {include!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), include))
    if base_path in _seen:
        raise ConfigError(f"{path}: include: {include} includes itself")
    base = read_yaml(base_path, _seen + (base_path,), origins)
    if origins is not None:
        origins.update(dict.fromkeys(flatten_dict(data), path))
    root = base.get("data", {}).get("root")
    if isinstance(root, str) and not os.path.isabs(os.path.expanduser(os.path.expandvars(root))):
        # a root inherited from the base stays relative to the base's folder
        base["data"]["root"] = os.path.relpath(os.path.join(os.path.dirname(base_path), root),
                                               os.path.dirname(os.path.abspath(path)))
    return _merge(base, data)


def load_config(path: str, overrides: Optional[dict] = None) -> Config:
    """Read a YAML job file (safe loader), apply dotted overrides, validate."""
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return config_from_file(data, path)


def config_from_file(data: dict, path: str) -> Config:
    """A file's data as a validated Config; data.root and finetune.checkpoint relative to the file."""
    cfg = from_dict(Config, data, "", path)
    cfg.source = path
    here = os.path.dirname(os.path.abspath(path))
    for section, key in ((cfg.data, "root"), (cfg.finetune, "checkpoint")):   # relative to the job file
        value = getattr(section, key)
        if value is not None:
            value = os.path.expanduser(os.path.expandvars(value))
            setattr(section, key, value if os.path.isabs(value) else os.path.normpath(os.path.join(here, value)))
    return validate(cfg)


def with_overrides(cfg: Config, overrides: dict) -> Config:
    """A copy of cfg with dotted keys replaced, validated like a file (errors name the key)."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    return config_from_dict(data, cfg.source or "<config>")


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = from_dict(Config, data, "", source)
    cfg.source = source
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    """The config as plain data (what config_from_dict reads back); `source` is not a key."""
    out = dataclasses.asdict(cfg)
    out.pop("source")
    return out


# What a checkpoint's config may differ in and still be resumed: more epochs, evaluation-only
# values, names, tracking, where the data lives and how it is read (never what is trained).
# (sweep., matrix., tracking.: sections that checkpoints written before orchestrator/job.py held)
FINGERPRINT_IGNORES = ("name", "source", "optim.epochs", "eval.", "checkpoint.", "sweep.", "matrix.", "tracking.",
                       "finetune.", "data.root", "data.num_workers", "data.options.cache_size", "data.test_levels",
                       "data.check_sample")


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """{"method": {"sigma": 0.05}} -> {"method.sigma": 0.05} (an empty mapping stays a value)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


LATER_DEFAULTS = {"optim.precision": "fp32", "method.memory_dtype": "fp32", "data.check_sample": None}  # added later


def flat_config(cfg_dict: dict) -> dict:
    """flatten_dict, without data.unseen when nothing is held out and without keys added later at
    their default: the same keys as a config (a checkpoint, a sweep's definition) written before."""
    flat = flatten_dict(cfg_dict)
    if not flat.get("data.unseen.classes") and not flat.get("data.unseen.fraction"):
        flat = {k: v for k, v in flat.items() if not k.startswith("data.unseen.")}
    return {k: v for k, v in flat.items() if k not in LATER_DEFAULTS or LATER_DEFAULTS[k] != v}


def fingerprint_fields(cfg_dict: dict) -> dict:
    """The flattened config values that define a training run (see FINGERPRINT_IGNORES)."""
    return {k: v for k, v in flat_config(cfg_dict).items()
            if not any(k == ign or (ign.endswith(".") and k.startswith(ign)) for ign in FINGERPRINT_IGNORES)}


def config_fingerprint(cfg_dict: dict) -> str:
    """A short hash of fingerprint_fields: equal for the same training whatever the worker count,
    the number of epochs or the evaluation-only values."""
    import hashlib
    import json
    blob = json.dumps(fingerprint_fields(cfg_dict), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_resumable(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume a checkpoint written by another config, naming the keys that differ."""
    a, b = fingerprint_fields(saved), fingerprint_fields(current)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now" for k in diff[:5])
        raise ConfigError(f"{where}: the checkpoint was written by another config ({shown}"
                          f"{'; ...' if len(diff) > 5 else ''}); use another run name, or the same config")
