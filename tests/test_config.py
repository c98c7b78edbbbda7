"""The config schema: every bad value gives one ConfigError naming the file and the key."""
import os
import subprocess
import sys

import pytest
import yaml

from grafit_core.config import load_config
from grafit_core.errors import ConfigError
from orchestrator.job import load_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_overrides_and_relative_root(tmp_path):
    path = write(tmp_path, "data: {name: omniglot, root: ../data/omniglot, train_level: alphabet}\n"
                           "optim: {batch_size: 512}\n")
    cfg = load_config(path, {"method.sigma": 0.1, "optim.epochs": 3})
    assert cfg.data.root == os.path.normpath(str(tmp_path / ".." / "data" / "omniglot"))
    assert (cfg.method.sigma, cfg.optim.epochs, cfg.method.tau_base) == (0.1, 3, 0.99)
    assert cfg.lr == pytest.approx(0.2)            # 0.1 / 256 x 512
    assert cfg.eval_sigma == 0.1                   # voting sigma defaults to the training sigma
    assert isinstance(load_config(path, {"method.sigma": 1}).method.sigma, float)


@pytest.mark.parametrize("text,key", [
    ("method: {sigmaa: 0.1}\n", "method.sigmaa"),
    ("colour: red\n", "colour"),
    ("method: {sigma: fast}\n", "method.sigma"),
    ("optim: {epochs: 2.5}\n", "optim.epochs"),
    ("model: {small_stem: 1}\n", "model.small_stem"),
    ("method: {sigma: 0}\n", "method.sigma"),
    ("method: {sigma: -0.5}\n", "method.sigma"),
    ("method: {tau_base: 1.5}\n", "method.tau_base"),
    ("method: {tau_base: -0.1}\n", "method.tau_base"),
    ("method: {tau_base: 1.0}\n", "method.tau_base"),
    ("eval: {k: 0}\n", "eval.k"),
    ("eval: {k: many}\n", "eval.k"),
    ("eval: {sigma: 0}\n", "eval.sigma"),
    ("method: {w_inst: -1}\n", "method.w_inst"),
    ("model: {projector: conv}\n", "model.projector"),
    ("data: {check_images: ignore}\n", "data.check_images"),
    ("data: [1, 2]\n", "data"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(path) and key in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "method: {sigma: 0.1\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "absent.yaml"))


def test_tau_bounds_are_inclusive(tmp_path):
    assert load_config(write(tmp_path, "method: {tau_base: 0.9999}\n")).method.tau_base == 0.9999
    assert load_config(write(tmp_path, "method: {tau_base: 0}\n")).method.tau_base == 0.0


def test_yaml_is_parsed_safely(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    path = write(tmp_path, "data: {name: synthetic, train_level: species}\noptim: {batch_size: 16}\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "local", path], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"grafit: error: {path}: data.train_level: level 'species' is not a level of this dataset; "
        "available: none, l0, l1, l2"]
    bad = write(tmp_path, "method: {name: grafit}\n", "ok.yaml")
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "local", bad, "--methods", "grafit,dino"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown method 'dino'" in out.stderr


def test_include_merges_and_keeps_the_base_root_relative_to_the_base(tmp_path):
    (tmp_path / "sub").mkdir()
    base = write(tmp_path, "data: {name: omniglot, root: data/omniglot, train_level: alphabet}\n"
                           "method: {sigma: 0.2}\n", "base.yaml")
    path = write(tmp_path / "sub", "include: ../base.yaml\nmethod: {name: ce}\n")
    cfg = load_config(path)
    assert (cfg.method.name, cfg.method.sigma, cfg.data.train_level) == ("ce", 0.2, "alphabet")
    assert cfg.data.root == str(tmp_path / "data" / "omniglot")
    loop = write(tmp_path, "include: loop.yaml\n", "loop.yaml")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(loop)
    assert base


# Table 5 (paper): loss set x projector; conditioning is evaluation-only (every run reports
# cosine, conditioned and oracle mAP), so each training configuration is one file.
TABLE5 = {  # file: (w_knn, w_inst, w_ce, projector, softmax head gives p_c)
    "ce": (0.0, 0.0, 1.0, "none", True),
    "inst": (0.0, 1.0, 0.0, "none", False),
    "ce_inst": (0.0, 1.0, 1.0, "none", True),
    "knn_fc": (1.0, 0.0, 0.0, "linear", False),
    "grafit_fc": (1.0, 1.0, 0.0, "linear", False),
    "snca_plus": (1.0, 0.0, 0.0, "mlp", False),
    "grafit": (1.0, 1.0, 0.0, "mlp", False),
}


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_table5_rows_are_configurations(name):
    from grafit_core.methods import get_method
    cfg = load_config(os.path.join(ROOT, "jobs", "table5", f"{name}.yaml"))
    cls = get_method(cfg.method.name)
    got = tuple(cls.resolve(cfg, k) for k in ("w_knn", "w_inst", "w_ce", "projector"))
    assert got + (cls.head_gives_coarse,) == TABLE5[name]
    assert cfg.data.root == os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "omniglot"))


def test_every_job_file_loads():
    jobs = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, "jobs")) for f in files
            if f.endswith(".yaml")]
    assert len(jobs) >= 8
    for path in jobs:
        if os.sep + "submit" + os.sep in path:
            check_submit_spec(path)
        elif path.endswith("reproduction.yaml"):
            check_reproduction_spec(path)
        elif path.endswith("table6.yaml"):
            check_table6_spec(path)
        else:
            load_job(path)


def check_submit_spec(path):
    """A `grafit submit` spec: its job file loads and its flags parse with the real parser."""
    from orchestrator.cli import build_parser
    from orchestrator.submit import command_argv, load_spec, resolved_job
    spec = load_spec(path)
    with resolved_job(spec, path) as (resolved, _):
        argv = command_argv(spec, path, "/shared/checkpoints", resolved)
        args = build_parser().parse_args(argv)
        assert args.command == spec["kind"] and args.storage_path == "/shared/checkpoints"
        assert load_job(os.path.join(ROOT, args.config)).config.name == load_job(spec["config"]).config.name
    assert not os.path.exists(resolved)


def check_table6_spec(path):
    """benchmarks/finetune_table6.py's spec: every pre-training job and the fine-tuning job load."""
    from grafit_core.config import with_overrides
    spec = yaml.safe_load(open(path))
    here = os.path.dirname(path)
    for job in spec["pretrained"].values():
        if job is not None:
            assert load_config(os.path.join(here, "..", "table5", job), spec["pretrain_budget"]).optim.epochs >= 10
    base = load_config(os.path.join(here, "omniglot.yaml"), spec["pretrain_budget"])
    for head in spec["heads"]:
        assert with_overrides(base, {**spec["finetune"], "finetune.head": head}).finetune.head == head


def check_reproduction_spec(path):
    """benchmarks/reproduce_table5.py's spec: every cell's config loads with the fixed budget."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from reproduce_table5 import cells
    spec = yaml.safe_load(open(path))
    seen = set()
    for label, job, overrides, seed in cells(spec):
        cfg = load_config(os.path.join(os.path.dirname(path), job), {**overrides, "seed": seed})
        assert cfg.optim.epochs >= 10 and cfg.optim.batch_size == 256
        seen.add(label)
    assert seen == set(spec["rows"]) | set(spec["equal_time"])


def test_a_submit_spec_with_bad_options_names_them():
    from grafit_core.errors import ConfigError
    from orchestrator.submit import check_locally
    for argv, msg in ((["sweep", "jobs/smoke.yaml", "--workers", "2"], "unrecognized arguments: --workers 2"),
                      (["train", "jobs/smoke.yaml", "--workers", "x"],
                       "argument --workers: expected N or MIN-MAX with 1 <= MIN <= MAX, got 'x'")):
        with pytest.raises(ConfigError, match=f"^spec.yaml: options: {msg}$"):
            check_locally(argv, "spec.yaml")


def test_jobs_list_is_newest_first_with_times_status_and_the_grafit_command():
    from types import SimpleNamespace

    from orchestrator.submit import ENTRYPOINT, job_rows
    status = SimpleNamespace
    listed = [SimpleNamespace(submission_id="old", job_id=None, status=status(value="SUCCEEDED"),
                              entrypoint=ENTRYPOINT + "train jobs/smoke.yaml", start_time=1_000_000,
                              end_time=1_095_000),
              SimpleNamespace(submission_id=None, job_id="new", status=status(value="RUNNING"),
                              entrypoint="python other.py", start_time=9_000_000, end_time=None)]
    rows = job_rows(listed, now_ms=12_725_000)
    assert [r["id"] for r in rows] == ["new", "old"]
    assert rows[0]["duration"] == "1h02m05s" and rows[1]["duration"] == "0h01m35s"     # running: until now
    assert rows[1]["command"] == "grafit train jobs/smoke.yaml" and rows[0]["command"] == "python other.py"
    assert rows[0]["status"] == "RUNNING" and rows[1]["submitted"].count(":") == 2


@pytest.mark.parametrize("files, flags, said", [
    ({"job.yaml": "include: smoke.yaml\nname: x\n"}, ["--set", "method.sigma=-1"], "--set method.sigma: must be > 0"),
    ({"base.yaml": "include: smoke.yaml\nmethod: {sigma: -2}\n", "job.yaml": "include: base.yaml\n"}, [],
     "{tmp}/base.yaml (included by {tmp}/job.yaml): method.sigma: must be > 0"),
    ({"job.yaml": "include: smoke.yaml\n"}, ["--set", "data.train_level=zz"], "--set data.train_level: level 'zz'"),
    ({"job.yaml": "include: smoke.yaml\nmethod: {sigma: -3}\n"}, [], "{tmp}/job.yaml: method.sigma: must be > 0")])
def test_an_error_names_where_the_value_came_from(files, flags, said, tmp_path, capsys):
    # a value given with --set, or merged from an included file, is blamed there, not on the job file
    from orchestrator.cli import main
    (tmp_path / "smoke.yaml").write_text(open(os.path.join(ROOT, "jobs", "smoke.yaml")).read())
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(["train", str(tmp_path / "job.yaml"), "--check", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grafit: error: " + said.format(tmp=tmp_path)) and err.count("\n") == 1, err
