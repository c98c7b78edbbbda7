"""Sweeps survive their driver (a rerun of the same command continues the sweep) and rank
configurations by the mean over their replicates (issue 15)."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from tiny import tiny_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = tiny_job("resume", epochs=3)


def write(tmp_path, job) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def runs_of(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return c, runs, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def finished(trials: str) -> list[str]:
    return [os.path.dirname(p) for p in glob.glob(os.path.join(trials, "*", "trial.json"))]


@pytest.mark.timeout(900)
def test_an_interrupted_or_killed_sweep_driver_is_continued_by_the_same_command(tmp_path):
    from grafit_core.config import config_from_dict
    from grafit_core.data import prepare_data
    from grafit_core.engine import fit
    # a larger collection and checkpoints inside epochs: a trial is interrupted in the middle of an epoch
    job = {**BASE, "data": {**BASE["data"], "options": {**BASE["data"]["options"], "per_class": 100}},
           "checkpoint": {"every_steps": 25},
           "sweep": {"space": {"method.sigma": {"grid": [0.05, 0.1]}}, "scheduler": "fifo", "max_concurrent": 1}}
    path = write(tmp_path, job)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Tune's own state is saved rarely: the rerun must not depend on it
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0",
           "TUNE_GLOBAL_CHECKPOINT_S": "100000"}
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", path, "--num-cpus", "2",
           "--storage-path", str(tmp_path / "runs")]
    trials = str(tmp_path / "runs" / "trials")
    # Ctrl-C (SIGINT to the driver) during the first trial: Tune returns as if the sweep were done;
    # grafit says it was interrupted, prints no best, marks its runs KILLED and exits non-zero
    interrupted = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not glob.glob(os.path.join(trials, "*", "checkpoint_*", "train_state.pt")):
            assert interrupted.poll() is None and time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        os.kill(interrupted.pid, signal.SIGINT)
        out, err = interrupted.communicate(timeout=300)
    finally:
        if interrupted.poll() is None:
            os.killpg(interrupted.pid, signal.SIGKILL)
    assert interrupted.returncode == 2, out[-2000:] + err[-2000:]
    assert "grafit: error: sweep resume interrupted: 2 of 2 trials unfinished" in err and "best" not in out
    _, _, parents, children = runs_of(uri, "resume")
    assert [r.info.status for r in parents + children] == ["KILLED", "KILLED"] and not finished(trials)
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 400

        def second_checkpointed():
            done = finished(trials)
            return len(done) == 1 and any(glob.glob(os.path.join(d, "checkpoint_*", "train_state.pt"))
                                          for d in glob.glob(os.path.join(trials, "*")) if d not in done)

        while not second_checkpointed():
            assert first.poll() is None and time.time() < deadline, "the first trial did not finish in time"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)              # the driver, its trials and the local Ray
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"],
                       capture_output=True, timeout=120)
    assert len(finished(trials)) == 1                    # killed while the second trial trained
    c, _, _, children = runs_of(uri, "resume")
    (done_before,) = [r for r in children if r.info.status == "FINISHED"]
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    c, runs, parents, children = runs_of(uri, "resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    again = next(r for r in children if r.info.run_id == done_before.info.run_id)
    assert again.info.end_time == done_before.info.end_time      # replayed, not retrained
    assert parents[0].data.tags["best.run_id"] in {r.info.run_id for r in children}
    import torch
    torch.set_num_threads(1)                              # as the 1-CPU worker
    for run in children:
        assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]   # each epoch once
        cfg = config_from_dict({**{k: v for k, v in job.items() if k != "sweep"},
                                "method": {"sigma": float(run.data.params["method.sigma"])}})
        train, query = prepare_data(cfg.data)
        reference = fit(cfg, train, query, log=lambda s: None).metrics   # never interrupted
        for key in ("knn_top1/l2", "map_cosine/l2", "map_cond/l1"):
            assert run.data.metrics[key] == pytest.approx(reference[key], abs=1e-5), (run.info.run_name, key)


@pytest.mark.timeout(900)
def test_a_rerun_sweep_trains_nothing_again_and_asha_stops_the_same_trials(tmp_path, monkeypatch):
    """ASHA's rungs are rebuilt from the trials' stored epochs: rerunning a finished ASHA sweep
    replays every trial, stops the same ones at the same epoch and opens no run."""
    import ray
    from orchestrator.cli import main as grafit
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = {**BASE, "sweep": {"space": {"method.sigma": {"grid": [0.02, 0.05, 0.1, 0.5]}}, "scheduler": "asha",
                             "grace_period": 1, "metric": "online_knn_top1/l2", "max_concurrent": 1}}
    path = write(tmp_path, job)
    argv = ["sweep", path, "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2"]
    try:
        assert grafit(argv) == 0
        c, runs, _, children = runs_of(uri, "resume")
        before = {r.info.run_id: (r.info.status, r.info.end_time) for r in children}
        stopped = {r.data.params["method.sigma"] for r in children if r.info.status == "KILLED"}
        assert stopped and len(stopped) < 4               # ASHA stopped some trials, not all
        ray.shutdown()
        assert grafit(argv) == 0
    finally:
        ray.shutdown()
    c, runs2, parents, children = runs_of(uri, "resume")
    assert len(parents) == 1 and len(runs2) == len(runs)                # no run opened
    assert {r.info.run_id: (r.info.status, r.info.end_time) for r in children} == before


def test_a_changed_sweep_definition_is_refused_naming_the_keys(tmp_path, capsys):
    import json
    from orchestrator.cli import main as grafit
    job = {**BASE, "sweep": {"space": {"method.sigma": {"grid": [0.05, 0.1]}}, "scheduler": "fifo",
                             "metric": "online_knn_top1/l2"}}
    state = tmp_path / "runs" / "sweeps" / "resume"
    state.mkdir(parents=True)
    from orchestrator.job import job_dict, load_job
    (state / "definition.json").write_text(json.dumps(job_dict(load_job(write(tmp_path, job)))))
    changed = {**job, "sweep": {**job["sweep"], "space": {"method.sigma": {"grid": [0.05, 0.2]}}},
               "optim": {**job["optim"], "epochs": 4}}
    path = write(tmp_path, changed)
    assert grafit(["sweep", path, "--storage-path", str(tmp_path / "runs"), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: the sweep 'resume' in {tmp_path / 'runs'} was started with another definition" in err
    assert "optim.epochs: 3 then, 4 now" in err and "sweep.space.method.sigma.grid" in err
    # what only says where and how wide it runs may change
    wider = {**job, "sweep": {**job["sweep"], "workers": 2, "cpus_per_worker": 1}}
    assert grafit(["sweep", write(tmp_path, wider), "--storage-path", str(tmp_path / "runs"), "--check"]) == 0
    # ... but not the dataset's files (a data.root that now points at other images)
    (state / "dataset.json").write_text(json.dumps("0123456789abcdef"))
    assert grafit(["sweep", write(tmp_path, wider), "--storage-path", str(tmp_path / "runs"), "--check"]) == 2
    assert "was started on another dataset (fingerprint 0123456789abcdef, now " in capsys.readouterr().err



@pytest.mark.parametrize("name", ["trials", "sweeps", "trained"])
def test_a_sweep_named_after_a_folder_it_would_empty_is_refused(tmp_path, capsys, name):
    # Tune's folder <storage>/<name> is emptied at every start of a sweep
    from orchestrator.cli import main as grafit
    (tmp_path / "runs" / "trained" / "checkpoint_000001").mkdir(parents=True)   # a `grafit train` run's
    path = write(tmp_path, {**BASE, "name": name, "sweep": {"space": {"method.sigma": {"grid": [0.05, 0.1]}}}})
    assert grafit(["sweep", path, "--storage-path", str(tmp_path / "runs"), "--check"]) == 2
    assert f"{path}: name: {name!r} is taken in {tmp_path / 'runs'}" in capsys.readouterr().err
    assert (tmp_path / "runs" / "trained" / "checkpoint_000001").is_dir()


def test_a_finished_trial_stopped_while_it_replays_keeps_its_stored_final_report(tmp_path):
    from types import SimpleNamespace

    from orchestrator.job import job_from_dict, job_with
    from orchestrator.sweep import keep_finished
    from orchestrator.trials import TrialSpec, store_reports, trial_dir, trial_key
    job = job_from_dict({**BASE, "sweep": {"space": {"method.sigma": {"grid": [0.05, 0.1]}}}}, "sweep.yaml")
    spec = TrialSpec({}, "sweep.yaml", "", "", "", str(tmp_path), "resume", 0, ["l2"])
    finished, cut = {"method.sigma": 0.05}, {"method.sigma": 0.1}
    final = {"epoch": 4, "trained": 1, "knn_top1/l2": 0.5}
    store_reports(trial_dir(spec, trial_key(job_with(job, finished))), [{"epoch": 1}, final])
    grid = [SimpleNamespace(config=finished, error=None, metrics={"epoch": 1}),   # ASHA stopped its replay
            SimpleNamespace(config=cut, error=None, metrics={"epoch": 1})]        # stopped, never finished
    keep_finished(grid, job, spec)
    assert [r.metrics for r in grid] == [final, {"epoch": 1}]

@pytest.mark.timeout(900)
def test_replicates_are_aggregated_and_the_best_is_chosen_by_their_mean(tmp_path, monkeypatch, capsys):
    import statistics
    import ray
    from orchestrator.cli import main as grafit
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = {**BASE, "optim": {"epochs": 1, "batch_size": 16},
           "sweep": {"space": {"method.sigma": {"grid": [0.05, 0.5]}, "seed": {"grid": [0, 1]}},
                     "scheduler": "fifo", "max_concurrent": 2}}
    try:
        assert grafit(["sweep", write(tmp_path, job), "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2"]) == 0
    finally:
        ray.shutdown()
    c, runs, (parent,), children = runs_of(uri, "resume")
    aggregates = [r for r in children if r.data.tags.get("grafit.kind") == "aggregate"]
    trials = [r for r in children if "grafit.trial_key" in r.data.tags]
    assert len(aggregates) == 2 and len(trials) == 4 and len(children) == 6
    means = {}
    for agg in aggregates:
        sigma = agg.data.params["method.sigma"]
        assert "seed" not in agg.data.params and agg.info.status == "FINISHED"
        mine = [r for r in trials if r.data.params["method.sigma"] == sigma]
        assert sorted(r.data.params["seed"] for r in mine) == ["0", "1"] and agg.data.metrics["seeds"] == 2
        for key in ("knn_top1/l2", "map_cosine/l2", "map_cond/l1", "knn_top1/l0"):
            values = [r.data.metrics[key] for r in mine]
            assert agg.data.metrics[key] == pytest.approx(statistics.mean(values), abs=1e-9), key
            assert agg.data.metrics[f"{key}/std"] == pytest.approx(statistics.stdev(values), abs=1e-9), key
        means[agg.info.run_id] = agg.data.metrics["knn_top1/l2"]
    assert parent.data.tags["best.run_id"] == max(means, key=means.get)
    assert parent.data.metrics["best/knn_top1/l2"] == pytest.approx(max(means.values()), abs=1e-9)
    out = capsys.readouterr().out
    assert "best (highest mean knn_top1/l2 over 2 replicate(s))" in out and f"{100 * max(means.values()):.1f} ±" in out
    # what the UI shows: the model-training view, the table in the description, one figure per parameter
    exp = c.get_experiment_by_name("resume")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{exp.experiment_id}?workflowType=machine_learning" in out
    note = parent.data.tags["mlflow.note.content"]
    best = max(aggregates, key=lambda r: r.data.metrics["knn_top1/l2"])
    lines = note.splitlines()
    first_row = lines[next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1]   # best first
    assert first_row.startswith(f"| {best.data.params['method.sigma']} | 2 | ")
    m = best.data.metrics
    assert f"{100 * m['knn_top1/l2']:.1f} ± {100 * m['knn_top1/l2/std']:.1f}" in first_row
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id, "sweep")} | \
        {a.path for a in c.list_artifacts(parent.info.run_id, "figures")}
    assert {"sweep/configurations.md", "figures/param_method.sigma.png"} <= artifacts


def test_the_dataset_fingerprint_follows_the_files_not_where_they_live(tmp_path):
    # a sweep may move its data.root between runs (a cluster mounts it elsewhere), not change its files
    import shutil

    from grafit_core.data.folders import load_folders
    from orchestrator.tracking import dataset_fingerprint
    for c in ("A/a1", "A/a2", "B/b1"):
        (tmp_path / "x" / c).mkdir(parents=True)
        (tmp_path / "x" / c / "i.png").write_bytes(b"1234")
    first = dataset_fingerprint(*load_folders(str(tmp_path / "x"), levels=["a", "b"]))
    shutil.move(tmp_path / "x", tmp_path / "y")
    assert dataset_fingerprint(*load_folders(str(tmp_path / "y"), levels=["a", "b"])) == first
    (tmp_path / "y" / "B" / "b1" / "i.png").write_bytes(b"12345")
    assert dataset_fingerprint(*load_folders(str(tmp_path / "y"), levels=["a", "b"])) != first
