"""Coarse-to-fine matrix assembly, metric keys, CSV and figures (trial results are given), and one
real tiny matrix with its fine-tuning column."""
import math
from types import SimpleNamespace

import pytest

from grafit_core.config import config_from_dict
from orchestrator import matrix


def trial(method, level, metrics, error=None):
    return SimpleNamespace(config={"method.name": method, "data.train_level": level}, metrics=metrics, error=error)


def cells(knn, mapc):
    return {"trained": 1, "knn_top1/a": knn[0], "knn_top1/b": knn[1], "map_cosine/a": mapc[0],
            "map_cosine/b": mapc[1], "map_cond/b": 0.5, "online_knn_top1/b": 0.1}


GRID = [trial("grafit", "none", cells((0.9, 0.6), (0.3, 0.2))),
        trial("grafit", "a", cells((1.0, 0.8), (0.7, 0.5))),
        trial("ce", "none", {"trained": 0, "skipped": 1}),
        trial("ce", "a", cells((0.95, 0.7), (0.6, 0.4))),
        trial("ce", "b", None, error=RuntimeError("worker died"))]


def test_assemble_places_each_trial_in_its_cell_and_leaves_skipped_and_failed_blank():
    m = matrix.assemble(GRID, ["a", "b"])
    assert m["knn_top1"] == {"grafit": {"none": {"a": 0.9, "b": 0.6}, "a": {"a": 1.0, "b": 0.8}},
                             "ce": {"a": {"a": 0.95, "b": 0.7}}}
    assert m["map_cond"] == {"grafit": {"none": {"b": 0.5}, "a": {"b": 0.5}}, "ce": {"a": {"b": 0.5}}}
    assert m["map_oracle"] == {}


def test_metric_keys_name_method_training_and_test_level():
    flat = matrix.flat_metrics(matrix.assemble(GRID, ["a", "b"]))
    assert flat["knn_top1/grafit/train_a/test_b"] == 0.8
    assert flat["map_cosine/ce/train_a/test_a"] == 0.6
    assert "knn_top1/ce/train_none/test_a" not in flat and "knn_top1/ce/train_b/test_a" not in flat
    assert len(flat) == 2 * 3 * 2 + 3            # knn and cosine: 3 trained cells x 2 levels; cond: 3 cells


def test_csv_and_printed_matrix_show_skipped_cells():
    m = matrix.assemble(GRID, ["a", "b"])
    csv = matrix.to_csv(m["knn_top1"], ["none", "a", "b"], ["a", "b"]).splitlines()
    assert csv[0] == "method,train_level,test_a,test_b"
    assert csv[1] == "grafit,none,0.900000,0.600000"
    assert "ce,none,skipped,skipped" in csv and "ce,b,skipped,skipped" in csv
    text = matrix.format_matrix(m["knn_top1"]["ce"], ["none", "a", "b"], ["a", "b"]).splitlines()
    assert text[1].split() == ["train", "none", "skipped", "skipped"]
    assert text[2].split() == ["train", "a", "95.0", "70.0"]


def test_conditioned_and_oracle_map_not_finer_than_the_training_level_are_shown_as_not_meaningful():
    from orchestrator import figures
    oracle = {"trained": 1, "map_oracle/a": 1.0, "map_oracle/b": 0.9, "map_cond/a": 0.2, "map_cond/b": 0.6,
              "map_cosine/a": 0.5, "map_cosine/b": 0.4}
    grid = [trial("grafit", level, dict(oracle)) for level in ("none", "a", "b")]
    m = matrix.assemble(grid, ["a", "b"], ["a", "b"])
    assert m["map_oracle"]["grafit"] == {"none": {"a": 1.0, "b": 0.9}, "a": {"a": None, "b": 0.9},
                                         "b": {"a": None, "b": None}}
    assert m["map_cosine"]["grafit"]["b"] == {"a": 0.5, "b": 0.4}          # cosine mAP is always a result
    flat = matrix.flat_metrics(m)
    assert "map_oracle/grafit/train_a/test_a" not in flat and flat["map_cond/grafit/train_a/test_b"] == 0.6
    assert matrix.to_csv(m["map_cond"], ["none", "a", "b"], ["a", "b"]).splitlines()[2:] == \
        ["grafit,a,–,0.600000", "grafit,b,–,–"]
    text = matrix.format_matrix(m["map_oracle"]["grafit"], ["none", "a", "b"], ["a", "b"]).splitlines()
    assert text[2].split() == ["train", "a", "–", "90.0"]
    fig = figures.heatmap(m["map_oracle"]["grafit"], ["none", "a", "b"], ["a", "b"], "oracle")
    assert [t.get_text() for t in fig.axes[0].texts] == ["100.0", "90.0", "–", "90.0", "–", "–"]


def test_unseen_columns_show_knn_map_and_map_at_r_and_no_conditioned_map():
    # a column per test level for the held-out classes: conditioned/oracle mAP and fine-tuning "–" there
    m = {"trained": 1, "knn_top1/b": 0.8, "map_cosine/b": 0.5, "map_at_r/b": 0.4, "map_cond/b": 0.6,
         "map_oracle/b": 0.9, "knn_top1/b/unseen": 0.3, "map_cosine/b/unseen": 0.2, "map_at_r/b/unseen": 0.1}
    out = matrix.assemble([trial("grafit", "a", m)], ["b", "b/unseen"], ["a", "b"])
    assert out["knn_top1"]["grafit"]["a"] == {"b": 0.8, "b/unseen": 0.3}
    assert out["map_at_r"]["grafit"]["a"] == {"b": 0.4, "b/unseen": 0.1}
    assert out["map_cond"]["grafit"]["a"] == {"b": 0.6, "b/unseen": None}
    assert out["map_oracle"]["grafit"]["a"] == {"b": 0.9, "b/unseen": None}
    assert "finetune_top1" not in out
    text = matrix.format_matrix(out["map_cond"]["grafit"], ["a"], ["b", "b/unseen"]).splitlines()
    assert text[0].split() == ["test", "b", "test", "b/unseen"] and text[1].split() == ["train", "a", "60.0", "–"]
    assert matrix.to_csv(out["map_cond"], ["a"], ["b", "b/unseen"]).splitlines()[1] == "grafit,a,0.600000,–"


def test_matrix_sweep_is_a_fifo_grid_over_methods_and_levels():
    from orchestrator.job import job_from_dict, matrix_sweep
    sw = matrix_sweep(job_from_dict({"data": {"name": "synthetic"}, "matrix": {"methods": ["grafit", "ce"]}}, "<dict>"),
                      ["l0", "l1"])
    assert sw.sweep.space == {"method.name": {"grid": ["grafit", "ce"]},
                              "data.train_level": {"grid": ["none", "l0", "l1"]}}
    assert sw.sweep.scheduler == "fifo" and sw.matrix.train_levels == ["none", "l0", "l1"]


@pytest.mark.parametrize("sweep,key", [({"search": "tpe", "space": {"method.sigma": {"choice": [0.05, 0.1]}}},
                                       "sweep.search"), ({"seeds": 3}, "sweep.seeds")])
def test_a_matrix_runs_every_cell_once(sweep, key):
    from grafit_core.errors import ConfigError
    from orchestrator.job import job_from_dict, matrix_sweep
    job = job_from_dict({"data": {"name": "synthetic"}, "sweep": {**sweep, "scheduler": "fifo"}}, "m.yaml")
    with pytest.raises(ConfigError, match=f"^m.yaml: {key}: .*a matrix runs every cell once"):
        matrix_sweep(job, ["l0", "l1"])


def test_figures_render():
    from orchestrator import figures
    m = matrix.assemble(GRID, ["a", "b"])
    fig = figures.heatmap(m["knn_top1"]["ce"], ["none", "a", "b"], ["a", "b"], "ce")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["skipped", "skipped", "95.0", "70.0", "skipped", "skipped"]
    fig = figures.level_lines(m["knn_top1"], ["none", "a", "b"], "b", "knn_top1")
    lines = {l.get_label(): list(l.get_ydata()) for l in fig.axes[0].get_lines()}
    assert lines["grafit"] == [60.0, 80.0] and lines["ce"] == [70.0]
    assert not math.isnan(lines["ce"][0])


def test_report_rebuilds_matrices_and_figures_from_mlflow(tmp_path, capsys):
    from orchestrator import tracking
    from orchestrator.cli import main as grafit
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from orchestrator.journal import Journal
    run_id = tracking.start_run(uri, "report-test", "matrix", {"name": "report-test"}, {})
    m = matrix.assemble(GRID, ["a", "b"])
    log = Journal(uri, run_id, str(tmp_path / "journal" / "parent.jsonl"))
    matrix.log_matrices(log, m, ["none", "a", "b"], ["a", "b"])
    log.end(True)
    assert log.close(60)
    out = tmp_path / "report"
    assert grafit(["report", "report-test", "--out", str(out), "--backend-store-uri", uri]) == 0
    text = capsys.readouterr().out
    assert "== knn_top1 (%) of ce" in text and "95.0" in text
    files = sorted(p.name for p in out.iterdir())
    assert "heatmap_knn_top1_grafit.png" in files and "levels_knn_top1.png" in files
    assert (out / "knn_top1.csv").read_text() == matrix.to_csv(m["knn_top1"], ["none", "a", "b"], ["a", "b"])
    # the metrics logged on the run are the matrices' cells
    from mlflow.tracking import MlflowClient
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged == matrix.flat_metrics(m)


def test_report_of_a_sweep_keeps_trials_and_their_means_apart_and_shows_unseen_columns(tmp_path, capsys):
    from orchestrator import tracking
    from orchestrator.cli import main as grafit
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.start_run(uri, "rep", "sweep rep", {"sweep": {"space": {"seed": {"grid": [0, 1]}}}}, {})
    c = tracking.client(uri)
    for seed, value in ((0, 0.5), (1, 0.7)):
        run = tracking.start_run(uri, "rep", f"rep/seed={seed}", {"seed": seed}, {"grafit.trial_key": str(seed)},
                                 parent)
        c.log_metric(run, "knn_top1/l2", value)
        c.log_metric(run, "knn_top1/l2/unseen", value / 2)
    mean = tracking.start_run(uri, "rep", "rep/mean ", {}, {"grafit.kind": "aggregate"}, parent)
    c.log_metric(mean, "knn_top1/l2", 0.6)
    assert grafit(["report", parent, "--out", str(tmp_path / "out"), "--backend-store-uri", uri]) == 0
    out = capsys.readouterr().out
    trials, means = out.split("means over replicates (1 configurations):")
    assert "2 trials of sweep rep" in trials and "60.0" not in trials and "mean" not in trials
    assert "knn_top1/l2/unseen" in trials and "25.0" in trials and "35.0" in trials
    assert "60.0" in means and "seed=" not in means


@pytest.mark.timeout(600)
def test_matrix_fine_tuning_column_is_recorded_next_to_knn_and_map(tmp_path, monkeypatch, capfd):
    """A real tiny matrix with matrix.finetune: the cell's trunk is fine-tuned at each test level
    (Ray Train fits), and the value equals fine-tuning the cell's logged checkpoint here. Its output
    (all of it, at the file descriptors): one line per epoch of the cell, the trials' states, the
    final tables; no Ray internals, no line twice."""
    ray = pytest.importorskip("ray")
    import yaml
    from mlflow.tracking import MlflowClient
    from grafit_core.config import with_overrides
    from orchestrator.job import load_job
    from grafit_core.data import prepare_data
    from grafit_core.finetune import finetune
    from orchestrator.cli import main as grafit
    job = {"name": "ft-matrix",
           "data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                    "test_levels": ["l1", "l2"],
                    "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
           "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
           "optim": {"epochs": 1, "batch_size": 16}, "eval": {"val_size": 20, "k_candidates": [3, 5]},
           "matrix": {"methods": ["grafit"], "train_levels": ["l0"], "finetune": True},
           "finetune": {"epochs": 2, "batch_size": 16, "base_lr": 0.05},
           "sweep": {"cpus_per_worker": 1}}
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(job))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        assert grafit(["matrix", str(path), "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2"]) == 0
    finally:
        ray.shutdown()
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    epochs = [line for line in lines if " epoch " in line]
    assert len(epochs) == 1 and epochs[0].startswith("[train_level=l0,name=grafit] epoch 1/1: loss="), lines
    assert not [line for line in lines if "TrainingReport(" in line or "pid=" in line or "WARNING" in line], lines
    logged = [line for line in lines if not line.startswith(("train ", " "))]     # table rows repeat by design
    assert len(logged) == len(set(logged)), lines
    assert "== finetune_top1 (%) of grafit: rows = training level, columns = test level ==" in lines
    assert len(lines) < 60, lines
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("ft-matrix").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    (cell,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    ckpt = c.download_artifacts(cell.info.run_id, "checkpoint", str(tmp_path / "dl"))
    cfg = load_job(str(path)).config
    train, test = prepare_data(cfg.data)
    for level in ("l1", "l2"):
        value = parent.data.metrics[f"finetune_top1/grafit/train_l0/test_{level}"]
        assert value == cell.data.metrics[f"finetune_top1/{level}"]
        ref = finetune(with_overrides(cfg, {"finetune.checkpoint": ckpt, "finetune.level": level}), train, test,
                       log=lambda s: None)
        assert value == pytest.approx(ref.metrics[f"finetune_top1/{level}"], abs=1e-6), level
        assert 0 <= parent.data.metrics[f"knn_top1/grafit/train_l0/test_{level}"] <= 1
