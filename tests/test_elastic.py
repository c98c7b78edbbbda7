"""Elastic worker groups (issue 18) on a real multi-node Ray of this machine (`ray.cluster_utils.Cluster`:
a raylet per node; removing a node SIGKILLs its processes): `--workers 1-2` grows back when a node
joins, takes a checkpoint on a preemption notice (`ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION`) and, when that node is then killed, goes on alone from it: the
preemption test runs as the one trial of a sweep (`grafit sweep` with `sweep.workers: "1-2"`), so an
elastic trial survives a lost node too. This module's Ray is its own: it stops nothing else on the
machine."""
import glob
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)
from faults import StepLog, picklable_by_value  # noqa: E402
from orchestrator.job import Workers, job_from_dict  # noqa: E402
from orchestrator.workers import tracked_training  # noqa: E402
from test_ray_train import JOB  # noqa: E402   72 images, batch 16: 4 global batches an epoch, 3 epochs


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "1"     # Ray Train's watcher of draining nodes (5 s)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    picklable_by_value()
    yield c
    ray.shutdown()
    c.shutdown()


def steps_of(path: str) -> list[tuple[int, int, int, int]]:
    return [tuple(map(int, line.split())) for line in open(path)]


def train_in_thread(tmp_path, job: dict, hook: StepLog) -> tuple[threading.Thread, dict]:
    """tracked_training of `job` with --workers 1-2 in a thread (a Cluster adds and removes nodes from
    the main thread only)."""
    out = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}

    def train():
        out["result"] = tracked_training(job_from_dict(job, "job.yaml"), uri=out["uri"], run_name="elastic",
                                         fingerprint="-", workers=Workers(1, 2), storage_path=str(tmp_path / "runs"),
                                         name="elastic", max_failures=2, resize_interval_s=2, on_step=hook)
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, out


def sweep_in_thread(tmp_path, monkeypatch, job: dict, hook: StepLog) -> tuple[threading.Thread, dict]:
    """`job` as a one-trial sweep whose trial is an elastic 1-2 group (run_sweep, as `grafit sweep`
    runs it: the trial's driver on the head node), in a thread."""
    from orchestrator.cli import build_parser
    from orchestrator.prepare import prepare
    from orchestrator.sweep import run_sweep
    out = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", out["uri"])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**job, "name": "elastic", "sweep": {
        "space": {"seed": {"grid": [job["seed"]]}}, "scheduler": "fifo", "workers": "1-2", "resize_interval_s": 2}}))
    prep = prepare("sweep", build_parser().parse_args(["sweep", str(path)]))

    def sweep():
        out["grid"], _ = run_sweep(prep, storage_path=str(tmp_path / "runs"), max_failures=2, on_step=hook)
    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    return thread, out


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.1)


def the_run(out: dict):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(out["uri"])
    run = client.get_run(out["result"].run_id)
    return run, [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size")]


def test_a_preempted_node_gets_a_checkpoint_and_the_trial_goes_on_without_it(cluster, tmp_path, monkeypatch):
    node = cluster.add_node(num_cpus=1)
    log = str(tmp_path / "steps")
    open(log, "w").close()
    # slow steps (2 s): the notice reaches the workers before the run ends; they ask at every batch
    thread, out = sweep_in_thread(tmp_path, monkeypatch, {**JOB, "checkpoint": {"preemption_probe_steps": 1}},
                                  StepLog(log, delay_s=2.0))
    wait_for(lambda: any(s[3] == 2 for s in steps_of(log)), "the group did not start at 2 workers")
    drain = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node", "--address",
                            cluster.address, "--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                            "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", "60"],
                           capture_output=True, text=True, timeout=120)
    assert drain.returncode == 0, drain.stderr

    def preemption_checkpoint():
        for path in glob.glob(str(tmp_path / "runs" / "trials" / "elastic-*" / "checkpoint_*" / "train_state.pt")):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["partial"]:                    # every_steps is off: only the notice checkpoints inside an epoch
                return state["epoch"], state["partial"]["batches"]
    wait_for(lambda: preemption_checkpoint() is not None, "no checkpoint after the preemption notice")
    done, batches = preemption_checkpoint()
    cluster.remove_node(node, allow_graceful=False)   # the reclaim: SIGKILL of the node's raylet and workers
    thread.join(400)
    assert out["grid"].num_errors == 0 and len(out["grid"]) == 1     # the trial survived its lost node
    rank0 = [(e, b, w) for e, b, r, w in steps_of(log) if r == 0]
    restart = next(i for i, s in enumerate(rank0) if s[2] == 1)
    # the lone worker continues from the preemption checkpoint: the rest of that epoch, then the next ones
    assert rank0[restart:] == [(e, b, 1) for e in range(done + 1, 4) for b in range(4) if (e, b) >= (done + 1, batches)]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(out["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("elastic").experiment_id],
                                filter_string="tags.`grafit.trial_key` != ''")
    assert run.info.status == "FINISHED" and run.data.tags["ray.world_size"] == "1" and \
        "," not in run.data.tags["ray.node_ids"]                 # the survivor's node only
    assert run.data.tags["grafit.preemption_checkpoint"] == f"epoch {done + 1}, after {batches} batches"
    assert f"ray.start.epoch{done}.batch{batches}" in run.data.tags
    world = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size")]
    assert world == [(0, 2.0), (done, 1.0)]              # each start of the group at its size
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]   # each epoch once


def test_a_group_started_small_grows_back_when_a_node_joins(cluster, tmp_path):
    log = str(tmp_path / "steps")
    open(log, "w").close()
    # a checkpoint after every batch; alone, the worker waits at the start of epoch 2 for the resize
    thread, out = train_in_thread(tmp_path, {**JOB, "checkpoint": {"every_steps": 1}},
                                  StepLog(log, wait_world=1, wait_epoch=2))
    wait_for(lambda: any(s[3] == 1 for s in steps_of(log)), "the group did not start at 1 worker")
    node = cluster.add_node(num_cpus=1)
    thread.join(400)
    assert out["result"].error is None
    rank0 = [(e, b, w) for e, b, r, w in steps_of(log) if r == 0]
    grown = next(i for i, s in enumerate(rank0) if s[2] == 2)
    assert all(w == 1 for _, _, w in rank0[:grown]) and all(w == 2 for _, _, w in rank0[grown:])
    # from the last checkpoint of the lone worker (every batch): every batch after it once, at 2 workers
    first = rank0[grown][:2]
    assert rank0[grown:] == [(e, b, 2) for e in (1, 2, 3) for b in range(4) if (e, b) >= first]
    run, world = the_run(out)
    assert run.info.status == "FINISHED" and run.data.tags["ray.world_size"] == "2"
    assert [w for _, w in world] == [1.0, 2.0]
    cluster.remove_node(node)
