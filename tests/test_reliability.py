"""Failure modes refused before any cluster resource is taken (issue 8)."""
import os
import socket

import pytest

from orchestrator.cli import main as grafit
from tiny import tiny_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "jobs", "smoke.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["train", SMOKE, "--workers", "1"],
                                     ["sweep", os.path.join(ROOT, "jobs", "sweeps", "omniglot_sigma_tau.yaml")]])
def test_an_unreachable_mlflow_server_is_refused_before_ray_starts(command, monkeypatch, capsys, tmp_path):
    ray = pytest.importorskip("ray")
    if "sweep" in command:                     # the sweep's own data: Omniglot, read before the check
        if not os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "omniglot")):
            pytest.skip("Omniglot is not at ../shared/data")
    uri = f"http://127.0.0.1:{free_port()}"    # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert grafit(command + ["--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"grafit: error: MLflow tracking server {uri} does not answer"), err
    assert "nothing was started" in err
    assert not ray.is_initialized()
    assert os.listdir(tmp_path) == []


BASE = tiny_job("reliability")


@pytest.mark.parametrize("flags", [["train", SMOKE, "--workers", "5", "--set", "optim.batch_size=20"],
                                   ["train", SMOKE, "--workers", "2", "--cpus-per-worker", "1.5"]])
def test_a_local_ray_too_small_is_refused_before_it_starts_and_leaves_nothing(flags, monkeypatch, capsys, tmp_path):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert grafit(flags + ["--num-cpus", "2", "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "CPUs but a local Ray here has 2 (--num-cpus)" in err and "nothing was started" in err, err
    assert not ray.is_initialized() and os.listdir(tmp_path) == []     # no Ray, no MLflow store, no run folder


def write_job(tmp_path, **changes):
    import yaml
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**BASE, **changes}))
    return str(path)


@pytest.mark.timeout(600)
def test_a_trial_killed_mid_epoch_is_marked_failed_and_the_sweep_goes_on(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient
    from faults import SigkillAt, picklable_by_value
    from orchestrator import sweep
    from orchestrator.cli import build_parser
    from orchestrator.prepare import connect_ray, prepare
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    marker = tmp_path / "killed"
    path = write_job(tmp_path, sweep={"space": {"method.sigma": {"grid": [0.05, 0.1]}}, "scheduler": "fifo",
                                      "max_concurrent": 1})
    prep = prepare("sweep", build_parser().parse_args(["sweep", path]))
    picklable_by_value()
    try:
        connect_ray(None, 2)
        # the first trial's worker: SIGKILL at step 2 of epoch 1 (the marker makes it once)
        grid, _ = sweep.run_sweep(prep, storage_path=str(tmp_path / "runs"), max_failures=0,
                                  on_step=SigkillAt(1, 1, 0, str(marker)))
    finally:
        ray.shutdown()
    assert marker.exists() and grid.num_errors == 1       # one trial failed, the sweep finished
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("reliability").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.status)
    assert [r.info.status for r in children] == ["FAILED", "FINISHED"]
    assert parent.info.status == "FINISHED" and parent.data.tags["best.run_id"] == children[1].info.run_id
    assert 0 <= children[1].data.metrics["knn_top1/l2"] <= 1


@pytest.mark.timeout(600)
def test_a_killed_driver_resumes_when_the_same_command_is_rerun(tmp_path):
    import glob
    import signal
    import subprocess
    import sys
    import time
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient
    from grafit_core.config import config_from_dict
    from grafit_core.data import prepare_data
    from grafit_core.engine import fit
    job = write_job(tmp_path, name="driver", optim={"epochs": 4, "batch_size": 16})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", job, "--workers", "1", "--num-cpus", "2",
           "--storage-path", str(tmp_path / "runs")]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(glob.glob(str(tmp_path / "runs" / "driver" / "checkpoint_*" / "train_state.pt"))) < 2:
            assert first.poll() is None and time.time() < deadline, "no checkpoint of epoch 2"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)              # the driver and the local Ray it started
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"],
                       capture_output=True, timeout=120)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[driver] resuming from " + str(tmp_path / "runs" / "driver" / "checkpoint_") in second.stdout
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("driver").experiment_id])   # the same run, continued
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]   # no gap, no repeat
    final = run.data.metrics
    cfg = config_from_dict({**BASE, "name": "driver", "optim": {"epochs": 4, "batch_size": 16}})
    import torch
    torch.set_num_threads(1)                              # as the 1-CPU worker
    train, query = prepare_data(cfg.data)
    reference = fit(cfg, train, query, log=lambda s: None).metrics   # the run never interrupted
    for key in ("knn_top1/l2", "map_cosine/l2", "map_cond/l1", "knn_top1/l0"):
        assert final[key] == pytest.approx(reference[key], abs=1e-5), key


@pytest.mark.timeout(600)
def test_mlflow_server_killed_mid_run_training_goes_on_and_the_records_are_replayed(tmp_path, monkeypatch):
    """The tracking server's process group is SIGKILLed after epoch 1 reached it: training goes on
    unblocked, the driver gives up waiting (offline_wait_s) and keeps the records; once the server
    is back, `grafit sync` sends them in order: one FINISHED run, every epoch once, no gap."""
    import glob
    import signal
    import subprocess
    import sys
    import time
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import CREDENTIALS, use_credentials
    port = free_port()
    senv = {**os.environ, "GRAFIT_MLFLOW_DIR": str(tmp_path / "mlflow"), "MLFLOW_PORT": str(port),
            "MLFLOW_WORKERS": "1"}
    server = os.path.join(ROOT, "cluster", "mlflow_server.sh")
    uri = f"http://127.0.0.1:{port}"
    job = write_job(tmp_path, name="offline", optim={"epochs": 5, "batch_size": 16},
                    data={**BASE["data"], "options": {"branching": [2, 3, 2], "per_class": 40, "queries_per_class": 2}},
                    tracking={"offline_wait_s": 3})
    credentials = str(tmp_path / "mlflow" / "credentials")       # the server's (it has authentication on)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0", CREDENTIALS: credentials}
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", job, "--workers", "1", "--num-cpus", "2",
           "--storage-path", str(tmp_path / "runs")]
    try:
        assert subprocess.run([server, "start"], env=senv, capture_output=True, timeout=180).returncode == 0
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, "")                     # their state before is restored after the test
        monkeypatch.setenv(CREDENTIALS, credentials)
        use_credentials()                                   # this process's MlflowClient
        run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        c = MlflowClient(uri)
        deadline = time.time() + 300
        while True:                                       # epoch 1 has reached the server
            assert run.poll() is None and time.time() < deadline, "epoch 1 never reached MLflow"
            exp = c.get_experiment_by_name("offline")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            if runs and c.get_metric_history(runs[0].info.run_id, "loss"):
                break
            time.sleep(0.2)
        run_id = runs[0].info.run_id
        pid = int(open(tmp_path / "mlflow" / "pid").read())
        os.killpg(pid, signal.SIGKILL)                    # the server and its workers, mid-run
        killed_at = time.time()
        out, _ = run.communicate(timeout=400)
        assert run.returncode == 0, out[-3000:]
        checkpoints = glob.glob(str(tmp_path / "runs" / "offline" / "checkpoint_*"))
        assert len(checkpoints) >= 2                      # epochs went on with the server gone
        assert "grafit sync" in out and time.time() - killed_at < 200
        journals = str(tmp_path / "runs" / "offline" / "mlflow_journal")
        assert subprocess.run([server, "start"], env=senv, capture_output=True, timeout=180).returncode == 0
        sync = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sync", journals], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stdout + sync.stderr
        final = c.get_run(run_id)
        assert final.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(run_id, "loss")] == list(range(1, 6))
        assert 0 <= final.data.metrics["knn_top1/l2"] <= 1
        assert {"checkpoint", "embeddings", "metrics.json"} <= {a.path for a in c.list_artifacts(run_id)}
        again = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sync", journals], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert "nothing to send" in again.stdout          # replayed once, not twice
    finally:
        subprocess.run([server, "stop"], env=senv, capture_output=True, timeout=120)


def test_journal_never_blocks_on_an_unreachable_server(tmp_path):
    import time
    from orchestrator.journal import Journal, last_sent, records
    j = Journal(f"http://127.0.0.1:{free_port()}", "run0", str(tmp_path / "rank0.jsonl"))
    start = time.time()
    for step in range(1, 21):
        j.log_metrics({"loss": 1.0 / step, "nan": float("nan")}, step, epoch=True)
    assert time.time() - start < 1.0                      # the training loop only appends
    assert not j.close(0.5)                               # nothing could be sent ...
    saved = records(str(tmp_path / "rank0.jsonl"))        # ... and nothing is lost
    assert [r["step"] for r in saved] == list(range(1, 21)) and last_sent(str(tmp_path / "rank0.jsonl")) == -1
    assert saved[0]["metrics"] == {"loss": 1.0} and j.epochs_logged() == 20


def test_submit_resolves_the_job_file_into_one_self_contained_yaml(tmp_path):
    # a job file outside the project, with an include of a project job and overrides: the resolved
    # file (inside the project, uploaded with the job) loads to the same config from any folder
    from orchestrator.job import job_dict, load_job
    from orchestrator.submit import resolved_job
    job = tmp_path / "job.yaml"
    job.write_text(f"include: {SMOKE}\nname: outside\nmethod: {{sigma: 0.07}}\n")
    spec = {"kind": "train", "config": str(job), "set": {"optim.epochs": 1, "eval.k_candidates": [3, 4],
                                                          "method.tau_base": 1e-05}}
    with resolved_job(spec, str(tmp_path / "spec.yaml")) as (resolved, _):
        assert os.path.dirname(os.path.dirname(resolved)) == ROOT and "\ninclude:" not in open(resolved).read()
        want, got = load_job(str(job), spec["set"]), load_job(resolved)
        assert job_dict(got) == job_dict(want) and got.config.method.tau_base == 1e-05
        assert got.config.data.root == want.config.data.root and got.config.name == "outside"
    assert not os.path.exists(resolved) and not os.path.exists(os.path.dirname(resolved))


def test_ap_counting_survives_nan_scores():
    import torch
    from grafit_core.ap import count_at_or_above_torch
    got = count_at_or_above_torch(torch.tensor([[0.1, 0.5]]), torch.tensor([[0.2, float("nan"), 0.6, float("-inf")]]))
    assert got.tolist() == [[2, 1]]                       # NaN and -inf count nowhere


def test_checkpoints_never_unpickle_arbitrary_objects(tmp_path):
    import torch
    from grafit_core.checkpoint import load_trained, saved_config
    marker = tmp_path / "executed"

    class Payload:                                         # what a malicious checkpoint does on load
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"method": {}, "meta": {"config": Payload()}}, tmp_path / "train_state.pt")
    for load in (saved_config, load_trained):
        with pytest.raises(Exception, match="Weights only load failed|weights_only"):
            load(str(tmp_path))
    assert not marker.exists()


def test_a_writer_killed_mid_write_never_replaces_a_good_file(tmp_path, monkeypatch):
    """Parquet embeddings, the reproduction results and the journal's sent marker: the writer
    dies (raises) after writing half a temporary file; the previous file is intact."""
    import json
    import sys
    import pyarrow.parquet as pq
    import torch
    from grafit_core.config import config_from_dict
    from grafit_core.data import prepare_data
    from orchestrator import journal, tracking
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from reproduce_table5 import save

    def dies(real):
        def write(obj, where, *a, **k):
            with open(where, "wb") as f:
                f.write(b"half a fi")
            raise KeyboardInterrupt("killed mid-write")
        return write

    train, _ = prepare_data(config_from_dict(BASE).data)
    part = str(tmp_path / "part.parquet")
    assert tracking.write_embeddings(torch.ones(len(train), 4), 0, train, 256, part)
    monkeypatch.setattr(pq, "write_table", dies(pq.write_table))
    with pytest.raises(KeyboardInterrupt):
        tracking.write_embeddings(torch.zeros(len(train), 4), 0, train, 256, part)
    monkeypatch.undo()
    assert pq.read_table(part).column("embedding").to_pylist()[0] == [1.0] * 4

    results = str(tmp_path / "results.json")
    save(results, {"a": 1})
    def half_json(obj, f, **kwargs):
        f.write("{half")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(json, "dump", half_json)
    with pytest.raises(KeyboardInterrupt):
        save(results, {"a": 2})
    monkeypatch.undo()
    assert json.load(open(results)) == {"a": 1}

    journal._mark_sent(str(tmp_path / "j.jsonl"), 7)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        journal._mark_sent(str(tmp_path / "j.jsonl"), 8)
    monkeypatch.undo()
    assert journal.last_sent(str(tmp_path / "j.jsonl")) == 7


def test_journal_resends_what_an_earlier_process_left_and_repairs_a_cut_line(tmp_path, monkeypatch):
    import json
    from orchestrator import journal
    sent = []
    path = str(tmp_path / "rank0.jsonl")
    down = journal.Journal("http://127.0.0.1:9", "r", path)       # the server is away: nothing is sent
    for step in (1, 2, 3):
        down.log_metrics({"loss": float(step)}, step, epoch=True)
    down.close(0.2)
    with open(path, "a") as f:
        f.write('{"seq": 3, "kind": "metr')                        # a writer killed mid-line
    monkeypatch.setattr(journal, "send", lambda rec, replaying=False: sent.append(rec["step"]))
    again = journal.Journal("http://127.0.0.1:9", "r", path)      # a restarted worker, the server back
    assert again.epochs_logged() == 3
    again.log_metrics({"loss": 4.0}, 4, epoch=True)
    assert again.close(5.0)
    assert sent == [1, 2, 3, 4]                                    # older records first, none lost
    assert [json.loads(line)["seq"] for line in open(path)] == [0, 1, 2, 3]
    assert journal.unsent(str(tmp_path)) == []


def test_a_replayed_end_never_overrides_a_run_closed_since(tmp_path):
    # a trial stopped by ASHA: its killed driver left "end FAILED" unsent, its sweep marked it KILLED;
    # replaying that journal later (a rerun of the sweep, grafit sync) must leave it KILLED
    from orchestrator import journal, tracking
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stopped = tracking.start_run(uri, "replay", "stopped", {"a": 1}, {})
    open_run = tracking.start_run(uri, "replay", "open", {"a": 1}, {})
    log = journal.Journal(uri, stopped, str(tmp_path / "driver.jsonl"), send_now=False)
    log.end(False)
    log.end(False, run_id=open_run)
    tracking.client(uri).set_terminated(stopped, status="KILLED")
    assert journal.replay(str(tmp_path / "driver.jsonl"), 10)
    c = tracking.client(uri)
    assert c.get_run(stopped).info.status == "KILLED"           # closed since: kept
    assert c.get_run(open_run).info.status == "FAILED"          # still open: the journal's end applies


def test_an_interrupted_sweep_marks_its_cut_short_trials_killed_whatever_their_drivers_sent(tmp_path):
    # Ctrl-C: the running trial's dying driver may close its run FAILED before or after the sweep
    # closes it; either way it ends KILLED, as does a trial ASHA stopped. A trial that errored stays
    # FAILED, and so does an older attempt of a cut trial that really failed.
    from types import SimpleNamespace

    from orchestrator import journal, tracking
    from orchestrator.job import job_from_dict, job_with
    from orchestrator.sweep import close_children
    from orchestrator.trials import trial_key
    from tiny import tiny_job
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sigmas = (0.05, 0.1, 0.2, 0.3)
    job = job_from_dict({**tiny_job("cut"), "sweep": {"space": {"method.sigma": {"grid": list(sigmas)}}}},
                        str(tmp_path / "sweep.yaml"))
    parent = tracking.start_run(uri, "cut", "sweep", {"a": 1}, {})
    params = [{"method.sigma": s} for s in sigmas]
    keys = [trial_key(job_with(job, p)) for p in params]
    older = tracking.start_run(uri, "cut", "t1 (first attempt)", {"a": 1}, {"grafit.trial_key": keys[1]}, parent)
    runs = [tracking.start_run(uri, "cut", f"t{i}", {"a": 1}, {"grafit.trial_key": k}, parent)
            for i, k in enumerate(keys)]
    c = tracking.client(uri)
    for run in (older, runs[0], runs[1], runs[3]):
        c.set_terminated(run, status="FAILED")  # errored; failed really; cut short, stopped: their drivers' ends
    grid = [SimpleNamespace(config=params[0], error=RuntimeError("boom")),
            SimpleNamespace(config=params[1], error=None, metrics={"epoch": 1}),
            SimpleNamespace(config=params[2], error=None, metrics={"epoch": 1}),
            SimpleNamespace(config=params[3], error=None, metrics={"epoch": 1})]   # stopped by ASHA
    log = journal.Journal(uri, parent, str(tmp_path / "parent.jsonl"))
    close_children(log, job, grid, cut_short=params[1:3])   # runs[2]: cut short, its driver's end not yet sent
    assert log.close(10)
    late = journal.Journal(uri, runs[2], str(tmp_path / "driver.jsonl"))
    late.end(False)                                       # the dying driver's end, after the sweep's
    assert late.close(10)
    assert [c.get_run(r).info.status for r in [older, *runs]] == ["FAILED", "FAILED", "KILLED", "KILLED", "KILLED"]


def test_a_closed_run_only_moves_up_and_a_rerun_replays_its_new_step_0_values(tmp_path):
    # FAILED -> KILLED -> FINISHED: a FINISHED left in a journal wins over the sweep's KILLED; a stale
    # FAILED of an earlier attempt sent first does not stick. A replay sends a new value at an old step.
    from orchestrator import journal, tracking
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    killed, resumed = (tracking.start_run(uri, "up", n, {"a": 1}, {}) for n in ("killed", "resumed"))
    c.set_terminated(killed, status="KILLED")
    log = journal.Journal(uri, killed, str(tmp_path / "a.jsonl"), send_now=False)
    log.end(False)
    log.end(True)
    log.end(False)
    assert journal.replay(str(tmp_path / "a.jsonl"), 10)
    assert c.get_run(killed).info.status == "FINISHED"
    again = journal.Journal(uri, resumed, str(tmp_path / "b.jsonl"), send_now=False)
    again.end(False)                                      # attempt 1's end, never sent
    again.end(True)                                       # attempt 2 trained to the end
    assert journal.replay(str(tmp_path / "b.jsonl"), 10)
    assert c.get_run(resumed).info.status == "FINISHED"
    best = journal.Journal(uri, resumed, str(tmp_path / "c.jsonl"), send_now=False)
    best.log_metrics({"best/x": 0.5}, step=0)
    assert journal.replay(str(tmp_path / "c.jsonl"), 10)
    best.log_metrics({"best/x": 0.7}, step=0)             # a rerun's new best, left for grafit sync
    assert journal.replay(str(tmp_path / "c.jsonl"), 10)
    assert journal.replay(str(tmp_path / "c.jsonl"), 10)  # replaying twice sends nothing twice
    assert [m.value for m in c.get_metric_history(resumed, "best/x")] == [0.5, 0.7]
