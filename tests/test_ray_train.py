"""Ray Train end to end: a real 2-worker TorchTrainer equals the same fit in plain gloo processes,
and a worker killed with SIGKILL mid-epoch resumes from the checkpoint to the same metrics."""
import os

import pytest
import torch

from grafit_core.config import config_from_dict
from grafit_core.data import prepare_data
from grafit_core.engine import fit
from gloo import run_gloo

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)

JOB = {"name": "ray-synthetic", "seed": 3,
       "data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
       "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
       "optim": {"epochs": 3, "batch_size": 16},
       "eval": {"val_size": 20, "k_candidates": [3, 5]}}


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def gloo_fit(ctx, job):
    """The same fit as a Ray Train worker runs, in a bare gloo process group."""
    torch.set_num_threads(1)
    cfg = config_from_dict(job)
    train, query = prepare_data(cfg.data)
    res = fit(cfg, train, query, ctx, log=lambda s: None)
    return res.metrics, [h["loss"] for h in res.history]


@pytest.fixture(scope="module")
def reference():
    return run_gloo(gloo_fit, 2, JOB)


def test_two_worker_torchtrainer_equals_plain_gloo_run(ray_local, reference, tmp_path):
    from orchestrator.workers import run_training
    result = run_training(config_from_dict(JOB), workers=2, storage_path=str(tmp_path), name="clean",
                          max_failures=0)
    assert result.error is None
    metrics, losses = reference[0]
    assert reference[1][0] == metrics                      # every rank computed the same metrics
    got = result.return_value
    assert [h["loss"] for h in got["history"]] == pytest.approx(losses, abs=1e-6)
    assert got["metrics"].keys() == metrics.keys()
    for key, value in metrics.items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key
    files = sorted(os.listdir(result.checkpoint.path))
    assert files == ["memory_000000000000_000000000036.pt", "memory_000000000036_000000000072.pt",
                     "train_state.pt"]


def test_worker_sigkill_mid_epoch_resumes_to_the_same_metrics(ray_local, reference, tmp_path, monkeypatch):
    from faults import SigkillAt, picklable_by_value
    from orchestrator.workers import run_training
    marker, steps = tmp_path / "killed", tmp_path / "steps"
    picklable_by_value()
    # a checkpoint after every global batch (4 an epoch): the restarted group goes on from inside epoch 2
    result = run_training(config_from_dict({**JOB, "checkpoint": {"every_steps": 1}}), workers=2,
                          storage_path=str(tmp_path), name="faulty", max_failures=1,
                          on_step=SigkillAt(2, 2, 1, str(marker), str(steps)))   # rank 1, before step 3 of epoch 2
    assert marker.exists(), "the worker was not killed"
    assert result.error is None
    rank0 = [tuple(map(int, line.split()[:2])) for line in open(steps) if line.split()[2] == "0"]
    # the restarted group did not go back to the start of epoch 2 (the checkpoint of epoch 1)
    assert rank0.count((2, 0)) == 1 and rank0[-6:] == [(2, 2), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    metrics, losses = reference[0]
    got = result.return_value
    assert [h["loss"] for h in got["history"]] == pytest.approx(losses, abs=1e-5)
    for key, value in metrics.items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-5), key


def test_a_refusal_on_a_connected_cluster_leaves_no_run_and_no_folder(ray_local, tmp_path):
    # the cluster's capacity is known only once connected: refused before the MLflow run and its
    # journal folder exist (the local case is refused before Ray starts: test_reliability)
    from mlflow.tracking import MlflowClient

    from grafit_core.errors import GrafitError
    from orchestrator.job import job_from_dict
    from orchestrator.workers import tracked_training
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(GrafitError, match="--workers 5 needs 5 CPUs"):
        tracked_training(job_from_dict(JOB, "job.yaml"), uri=uri, run_name="over", fingerprint="-", workers=5,
                         storage_path=str(tmp_path / "runs"), name="over")
    assert not (tmp_path / "runs").exists()
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
