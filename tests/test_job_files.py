"""Every job file under jobs/ works as shipped: each configuration it trains (a sweep's first drawn
values, every method of a matrix, the fine-tuning recipes) is run at a tiny budget (2 epochs on 6
alphabets of its own data) and must learn: kNN top-1 and mAP at the finest level clearly above the
same network untrained; a fine-tuned head well above chance. Specs that only point at job files
(jobs/submit/, the benchmark budgets) are checked to point at tested ones."""
import glob
import os
import tempfile

import pytest
import torch
import yaml

from grafit_core.config import config_fingerprint, to_dict, with_overrides
from grafit_core.data import NONE_LEVEL, prepare_data
from grafit_core.data.transforms import build_transform
from grafit_core.distributed import DistContext
from grafit_core.engine import embed, fit
from grafit_core.evaluate import evaluate
from grafit_core.finetune import finetune
from grafit_core.methods import get_method
from orchestrator.job import job_with, load_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "jobs")
SUBSET = ["Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian", "Cyrillic", "Latin"]
TINY = {"optim.epochs": 2}
SPECS = ("submit/", "table5/reproduction.yaml", "finetune/table6.yaml")   # point at job files, train nothing

pytestmark = pytest.mark.timeout(900)


def job_files() -> list[str]:
    found = sorted(os.path.relpath(p, JOBS) for p in glob.glob(os.path.join(JOBS, "**", "*.yaml"), recursive=True))
    return [p for p in found if not p.startswith(SPECS)]


def tiny(path: str):
    """The job at the tiny budget: its data cut to SUBSET (held-out classes: those inside it)."""
    job = load_job(os.path.join(JOBS, path))
    over = dict(TINY)
    if job.config.data.name == "omniglot":
        if not os.path.isdir(job.config.data.root or ""):
            pytest.skip(f"Omniglot is not at {job.config.data.root}")
        over["data.options.alphabets"] = SUBSET
        if job.config.data.unseen.active:
            over["data.unseen.classes"] = [a for a in job.config.data.unseen.classes if a in SUBSET]
    return job_with(job, over)


def variants(path: str) -> list:
    """The configurations a job file trains: its own; a sweep's first value of each parameter; a
    matrix's every method at its first supervised training level."""
    job = tiny(path)
    if job.matrix.methods:
        level = next(lv for lv in job.matrix.train_levels or [job.config.data.train_level] if lv != NONE_LEVEL)
        return [with_overrides(job.config, {"method.name": m, "data.train_level": level}) for m in job.matrix.methods]
    first = {key: next(iter(spec.values()))[0] for key, spec in job.sweep.space.items()}
    return [job_with(job, first).config]


def untrained(cfg, train, query) -> dict:
    """The metrics of the same network (same seed, same initialisation as fit) before any step."""
    channels = train.image(0).shape[0]
    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method.name)(cfg, channels, train.num_classes(cfg.data.train_level))
    tf = build_transform(cfg.data.augment, cfg.data.image_size, channels, train=False)
    bank, _ = embed(method, train, cfg, DistContext(), tf)
    queries, logits = embed(method, query, cfg, DistContext(), tf)
    return evaluate(cfg, bank, 0, train, queries, query, cfg.data.test_levels or train.hierarchy.levels,
                    query_logits=logits if cfg.data.train_level != NONE_LEVEL else None)


_FITS = {}


def trained(cfg):
    """fit once per distinct configuration (many job files train the same one)."""
    key = config_fingerprint(to_dict(cfg)) + cfg.method.name
    if key not in _FITS:
        torch.set_num_threads(2)
        train, query = prepare_data(cfg.data)
        folder = tempfile.mkdtemp(prefix="grafit-jobfile-")
        res = fit(cfg, train, query, log=lambda s: None,
                  on_epoch=lambda epoch, stats, save: save(folder) if epoch == cfg.optim.epochs else None)
        _FITS[key] = (res, untrained(cfg, train, query), train, folder)
    return _FITS[key]


@pytest.mark.parametrize("path", job_files())
def test_every_job_file_learns_at_a_tiny_budget(path):
    for cfg in variants(path):
        res, before, train, _ = trained(cfg)
        assert res.skipped is None, f"{path}: {res.skipped}"
        finest = (cfg.data.test_levels or train.hierarchy.levels)[-1]
        what = f"{path} ({cfg.method.name} at {cfg.data.train_level})"
        assert res.metrics[f"knn_top1/{finest}"] >= before[f"knn_top1/{finest}"] + 0.03, what
        assert res.metrics[f"map_cosine/{finest}"] >= before[f"map_cosine/{finest}"] + 0.02, what
        if cfg.data.unseen.active:
            assert res.metrics[f"knn_top1/{finest}/unseen"] > 5 / train.unseen[0].num_classes(finest), what


@pytest.mark.parametrize("head", ["fc", "mlp"])
def test_fine_tuning_recipes_learn_well_above_chance(head):
    # jobs/finetune/omniglot.yaml as shipped (its lr; the fc head), and table6.yaml's recipe with the mlp head
    pretrained = trained(tiny("omniglot.yaml").config)[3]
    job = tiny("finetune/omniglot.yaml")
    recipe = yaml.safe_load(open(os.path.join(JOBS, "finetune", "table6.yaml")))["finetune"] if head == "mlp" else {}
    cfg = with_overrides(job.config, {**recipe, "finetune.checkpoint": pretrained, "finetune.head": head,
                                      "finetune.epochs": 3})
    train, query = prepare_data(cfg.data)
    res = finetune(cfg, train, query, log=lambda s: None)
    chance = 1 / train.num_classes(cfg.finetune.level)
    assert res.metrics[f"finetune_top1/{cfg.finetune.level}"] >= 5 * chance, (head, res.metrics)


def test_specs_point_at_tested_job_files():
    tested = {os.path.normpath(os.path.join(JOBS, p)) for p in job_files()}
    for spec in glob.glob(os.path.join(JOBS, "submit", "*.yaml")):
        assert os.path.normpath(os.path.join(os.path.dirname(spec), yaml.safe_load(open(spec))["config"])) in tested
    for spec, key in (("table5/reproduction.yaml", "rows"), ("finetune/table6.yaml", "pretrained")):
        rows = yaml.safe_load(open(os.path.join(JOBS, spec)))[key]
        for name in filter(None, rows.values()):
            assert os.path.normpath(os.path.join(JOBS, "table5", name)) in tested, (spec, name)
