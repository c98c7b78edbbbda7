"""Sweeps: every validation error names its key; a real Ray Tune sweep is read back from MLflow."""
import os

import pytest
import yaml

from orchestrator.job import load_job
from grafit_core.errors import ConfigError
from orchestrator.cli import main as grafit
from tiny import tiny_job

BASE = tiny_job("sweep-test")


def write(tmp_path, sweep, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**BASE, "sweep": sweep}))
    return str(path)


@pytest.mark.parametrize("sweep,key", [
    ({"space": {"method.sigmaa": {"grid": [0.1]}}}, "sweep.space.method.sigmaa"),
    ({"space": {"eval.k": {"grid": [10, 20]}}}, "sweep.space.eval.k"),
    ({"space": {"method.sigma": [0.1, 0.2]}}, "sweep.space.method.sigma"),
    ({"space": {"method.sigma": {"normal": [0.1, 0.2]}}}, "sweep.space.method.sigma"),
    ({"space": {"method.sigma": {"grid": [0.1, 0]}}}, "sweep.space.method.sigma.grid"),
    ({"space": {"method.sigma": {"loguniform": [0, 0.2]}}}, "sweep.space.method.sigma.loguniform"),
    ({"space": {"method.sigma": {"uniform": [0.2, 0.1]}}}, "sweep.space.method.sigma.uniform"),
    ({"space": {"method.tau_base": {"grid": [0.99, 1.2]}}}, "sweep.space.method.tau_base.grid"),
    ({"space": {"method.tau_base": {"uniform": [-0.5, 0.9]}}}, "sweep.space.method.tau_base.uniform"),
    ({"space": {"optim.epochs": {"grid": [1.5]}}}, "sweep.space.optim.epochs.grid"),
    ({"space": {"model.projector": {"choice": ["mlp", "conv"]}}}, "sweep.space.model.projector.choice"),
    ({"space": {"name": {"grid": ["a", "b"]}}}, "sweep.space.name"),
    ({"eval_grid": {"method.sigma": [0.1]}}, "sweep.eval_grid.method.sigma"),
    ({"eval_grid": {"eval.k": [0, 5]}}, "sweep.eval_grid.eval.k"),
    ({"scheduler": "hyperband"}, "sweep.scheduler"),
    ({"search": "bayes"}, "sweep.search"),
    ({"workers": 0}, "sweep.workers"),
    ({"num_samples": "many"}, "sweep.num_samples"),
    ({"spaces": {}}, "sweep.spaces"),
])
def test_sweep_errors_name_the_key(tmp_path, sweep, key):
    path = write(tmp_path, sweep)
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert str(err.value).startswith(f"{path}: {key}:"), str(err.value)


@pytest.mark.parametrize("sweep,key", [
    ({"space": {"data.train_level": {"grid": ["none", "l1", "genus"]}}}, "sweep.space.data.train_level"),
    ({"space": {"method.sigma": {"grid": [0.1]}}, "eval_grid": {"eval.k": [5, 500]}}, "sweep.eval_grid.eval.k"),
])
def test_dataset_dependent_sweep_errors_come_before_ray(tmp_path, capsys, sweep, key):
    path = write(tmp_path, sweep)
    assert grafit(["sweep", path, "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"grafit: error: {path}: {key}: value"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(600)
def test_tune_sweep_tracked_in_mlflow(tmp_path, monkeypatch):
    """4 training configurations x 3 values of k: 4 trainings, 4 nested MLflow runs, everything logged."""
    import pyarrow.parquet as pq
    import ray
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    path = write(tmp_path, {"space": {"method.tau_base": {"grid": [0.99, 0.996]},
                                      "method.sigma": {"grid": [0.05, 0.1]}},
                            "eval_grid": {"eval.k": [3, 5, "auto"]}, "scheduler": "fifo", "max_concurrent": 2})
    try:
        assert grafit(["sweep", path, "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2"]) == 0
    finally:
        ray.shutdown()
    trainings = os.listdir(tmp_path / "runs" / "trials")
    assert len(trainings) == 4                       # one TorchTrainer per training configuration

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("sweep-test")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["best.run_id"] in {
        r.info.run_id for r in children}
    seen = set()
    for run in children:
        assert run.info.status == "FINISHED"
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        seen.add((params["method.tau_base"], params["method.sigma"]))
        assert params["optim.epochs"] == "2" and params["data.name"] == "synthetic"
        for key in ("knn_top1/l2", "knn_top1/l2/k3", "knn_top1/l2/k5", "knn_top1/l2/kauto", "map_cosine/l2",
                    "map_cond/l1/k5", "map_oracle/l2"):
            assert 0.0 <= metrics[key] <= 1.0, key
        history = c.get_metric_history(run.info.run_id, "online_knn_top1/l2")
        assert [m.step for m in history] == [1, 2]   # per-epoch, from rank 0 only
        assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
        assert tags["version.torch"] and tags["version.ray"] and len(tags["dataset.fingerprint"]) == 16
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"checkpoint", "embeddings", "metrics.json"} <= artifacts
        ckpt = {a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")}
        assert "checkpoint/train_state.pt" in ckpt
        local = c.download_artifacts(run.info.run_id, "embeddings", str(tmp_path / run.info.run_id))
        table = pq.read_table(local)
        assert table.num_rows == 72 and table.column("index").to_pylist() == list(range(72))
        assert {"label_l0", "label_l1", "label_l2", "embedding"} <= set(table.column_names)
    assert seen == {("0.99", "0.05"), ("0.99", "0.1"), ("0.996", "0.05"), ("0.996", "0.1")}
