"""A real cluster on this machine: `cluster/local.sh` (head + 1 worker node, 1 CPU each, token
authentication) and `cluster/mlflow_server.sh` (a real MLflow server), then `grafit submit` and Ray's
own `ray job submit`. The last test kills the worker node (`local.sh kill-node 1`: its raylet and every
process of the node, SIGKILL): an elastic run finishes on the head.

Teardown stops this cluster's nodes only (`local.sh stop`); other Rays of the machine keep running.
"""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from orchestrator.tracking import CREDENTIALS, use_credentials

pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(span: int = 1) -> int:
    """A port p with p ... p + span - 1 free (node I's dashboard agent listens on AGENT_PORT + I)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for p in range(port + 1, port + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    ports = {"RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(), "MLFLOW_PORT": free_port(),
             "AGENT_PORT": free_port(span=2)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))}
    env.update({k: str(v) for k, v in ports.items()})
    env.update(GRAFIT_CLUSTER_DIR=str(state / "ray"), GRAFIT_MLFLOW_DIR=str(state / "mlflow"), HEAD_CPUS="1",
               WORKER_CPUS="1", RAY_AUTH_TOKEN_PATH=str(state / "ray" / "auth_token"), RAY_USAGE_STATS_ENABLED="0")
    os.makedirs(state / "ray")
    info = {"env": env, "state": state, "url": f"http://127.0.0.1:{ports['DASHBOARD_PORT']}",
            "mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}", **ports}
    try:
        for script, args in (("local.sh", ["start", "1"]), ("mlflow_server.sh", ["start"])):
            p = subprocess.run([os.path.join(ROOT, "cluster", script), *args], env=env, capture_output=True,
                               text=True, timeout=180)
            assert p.returncode == 0, p.stdout + p.stderr
        info["token"] = open(env["RAY_AUTH_TOKEN_PATH"]).read().strip()
        info["credentials"] = str(state / "mlflow" / "credentials")   # the MLflow server's, for clients
        os.environ[CREDENTIALS] = info["credentials"]
        use_credentials()                       # this process's MlflowClient reads the server
        yield info
    finally:                                    # also when an assertion above or in a test fails
        for key in (CREDENTIALS, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)
        subprocess.run([os.path.join(ROOT, "cluster", "mlflow_server.sh"), "stop"], env=env, timeout=120)
        subprocess.run([os.path.join(ROOT, "cluster", "local.sh"), "stop"], env=env, timeout=120)


def grafit(args, env, timeout=420):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def api(cluster, path, token="", data=None):
    """A request to the job server; returns (status, body)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(cluster["url"] + path, headers=headers,
                                 data=json.dumps(data).encode() if data is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def submit_env(cluster):
    return {**cluster["env"], "MLFLOW_TRACKING_URI": cluster["mlflow"], CREDENTIALS: cluster["credentials"],
            "GRAFIT_STORAGE": str(cluster["state"] / "storage")}


def write_spec(tmp_path, **changes):
    spec = {"kind": "train", "config": os.path.join(ROOT, "jobs", "smoke.yaml"),
            "options": {"workers": 2, "cpus_per_worker": 1, "name": "e2e"},
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}, **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def job_count(cluster) -> int:
    status, jobs = api(cluster, "/api/jobs/", cluster["token"])
    assert status == 200, jobs
    return len(jobs)


def test_submit_trains_on_both_nodes_and_tracks_in_the_mlflow_server(cluster, tmp_path):
    from mlflow import MlflowClient
    p = grafit(["submit", write_spec(tmp_path), "--address", cluster["url"]], submit_env(cluster))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    job_id = re.search(r"submitted (\S+)", p.stdout).group(1)
    assert f"job {job_id}: SUCCEEDED" in p.stdout
    status, nodes = api(cluster, "/nodes?view=summary", cluster["token"])
    assert status == 200
    alive = {n["raylet"]["nodeId"] for n in nodes["data"]["summary"] if n["raylet"]["state"] == "ALIVE"}
    assert len(alive) == 2

    client = MlflowClient(cluster["mlflow"])                   # the REST client of the server
    exp = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    ranks = tags["ray.node_ids"].split(",")
    assert len(ranks) == 2 and set(ranks) == alive             # one worker on each node, in rank order
    table = p.stdout[p.stdout.index("test level"):]
    for level in ("l0", "l1", "l2"):                           # the printed table is what MLflow holds
        printed = re.search(rf"^{level}\s+\d+\s+([\d.]+)\s+([\d.]+)", table, re.M)
        assert float(printed.group(1)) == pytest.approx(100 * run.data.metrics[f"knn_top1/{level}"], abs=0.051)
        assert float(printed.group(2)) == pytest.approx(100 * run.data.metrics[f"map_cosine/{level}"], abs=0.051)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "embeddings", "metrics.json"} <= artifacts
    logged = json.load(open(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))))
    assert logged["metrics"]["knn_top1/l2"] == pytest.approx(run.data.metrics["knn_top1/l2"])
    assert os.path.isdir(cluster["state"] / "storage" / "e2e")  # checkpoints under the shared storage


def test_servers_listen_on_loopback_only(cluster):
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    for port in (cluster["DASHBOARD_PORT"], cluster["MLFLOW_PORT"]):
        local = [line.split()[3] for line in out.splitlines() if line.split()[3].endswith(f":{port}")]
        assert local, f"nothing listens on {port}"
        assert all(addr == f"127.0.0.1:{port}" for addr in local), local


def test_job_server_refuses_a_submission_without_the_token(cluster, tmp_path):
    before = job_count(cluster)
    assert api(cluster, "/api/jobs/", data={"entrypoint": "echo hi"})[0] == 401
    assert api(cluster, "/api/jobs/", token="0" * 64, data={"entrypoint": "echo hi"})[0] == 403
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    p = grafit(["submit", write_spec(tmp_path), "--address", cluster["url"], "--token-file", str(wrong)],
               submit_env(cluster))
    assert p.returncode == 2 and "refused" in p.stderr and "Invalid authentication token" in p.stderr, p.stderr
    assert job_count(cluster) == before


def test_bad_spec_is_refused_before_anything_is_submitted(cluster, tmp_path):
    before = job_count(cluster)
    p = grafit(["submit", write_spec(tmp_path, set={"method.sigma": -1.0}), "--address", cluster["url"]],
               submit_env(cluster))
    assert p.returncode == 2
    assert "method.sigma" in p.stderr and p.stderr.startswith("grafit: error:"), p.stderr
    p = grafit(["submit", write_spec(tmp_path, options={"workers": 2, "bogus_flag": 1}), "--address",
                cluster["url"]], submit_env(cluster))
    assert p.returncode == 2 and "--bogus-flag" in p.stderr, p.stderr
    assert job_count(cluster) == before


def ray_cli_env(cluster):
    """What `ray job submit` needs from the user's shell (the README's line): the token."""
    return {**cluster["env"], "RAY_AUTH_MODE": "token", "RAY_ADDRESS": cluster["url"]}


def ray_job_submit(cluster, command, env_vars=None, wait=True):
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray, "job", "submit", *([] if wait else ["--no-wait"]), "--working-dir", ROOT,
                           *runtime_env, "--", *command],
                          cwd=ROOT, env=ray_cli_env(cluster), capture_output=True, text=True, timeout=420)


def test_ray_job_submit_without_the_clusters_settings_is_refused_having_trained_nothing(cluster):
    from mlflow import MlflowClient
    p = ray_job_submit(cluster, ["grafit", "train", "jobs/smoke.yaml", "--workers", "2", "--name", "lost"],
                       {"MLFLOW_TRACKING_URI": "", "GRAFIT_STORAGE": ""})      # a cluster started without them
    assert p.returncode != 0 and "failed" in p.stdout, p.stdout[-3000:]
    refusal = {line for line in (p.stdout + p.stderr).splitlines() if line.startswith("grafit: error:")}
    assert len(refusal) == 1, refusal                         # one line (Ray shows the job's log twice)
    assert "inside a Ray job" in min(refusal) and "GRAFIT_STORAGE" in min(refusal), refusal
    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name("smoke")
    assert exp is None or not client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'lost'")
    assert not os.path.exists(cluster["state"] / "ray" / "storage" / "lost")


def test_a_sweep_whose_job_file_lives_outside_the_project(cluster, tmp_path):
    from mlflow import MlflowClient
    job = tmp_path / "experiments" / "sweep.yaml"
    job.parent.mkdir()
    job.write_text(f"include: {os.path.join(ROOT, 'jobs', 'smoke.yaml')}\nname: outside-sweep\noptim: {{epochs: 1}}\n"
                   "sweep:\n  space: {method.sigma: {grid: [0.1]}}\n  scheduler: fifo\n  workers: 1\n"
                   "  cpus_per_worker: 1\n")
    p = grafit(["submit", str(job), "--address", cluster["url"]], submit_env(cluster))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not os.path.exists(os.path.join(ROOT, ".submit"))           # the resolved copy left with the job
    client = MlflowClient(cluster["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("outside-sweep").experiment_id])
    trials = [r for r in runs if "grafit.trial_key" in r.data.tags]
    assert [r.data.params["method.sigma"] for r in trials] == ["0.1"]
    assert all(r.info.status == "FINISHED" and "knn_top1/l2" in r.data.metrics for r in trials)
    assert {r.data.tags["grafit.job_file"] for r in runs} == {str(job)}


def test_the_mlflow_server_answers_only_with_its_credentials(cluster, tmp_path):
    # MLflow's basic-auth app: the API refuses a request without credentials; grafit with wrong
    # ones stops at once, naming the variable, before any Ray or run
    import time
    req = urllib.request.Request(cluster["mlflow"] + "/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 401
    assert oct(os.stat(cluster["credentials"]).st_mode & 0o777) == "0o600"
    wrong = tmp_path / "credentials"
    wrong.write_text("[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = not-the-password\n")
    start = time.time()
    p = grafit(["train", "jobs/smoke.yaml", "--workers", "1", "--storage-path", str(tmp_path / "runs")],
               {**submit_env(cluster), CREDENTIALS: str(wrong)}, timeout=120)
    assert p.returncode == 2 and time.time() - start < 60, p.stderr
    assert p.stderr.startswith("grafit: error: MLflow tracking server") and f"{CREDENTIALS}" in p.stderr, p.stderr
    assert "(HTTP 401)" in p.stderr and not (tmp_path / "runs").exists()


def progress_of(run_dir) -> dict:
    """{(epochs done, batches of the next): checkpoint folder} of the complete checkpoints in run_dir."""
    from grafit_core.checkpoint import progress
    found = {}
    for path in glob.glob(os.path.join(run_dir, "checkpoint_*", "train_state.pt")):
        try:
            found[progress(os.path.dirname(path))] = os.path.dirname(path)
        except Exception:                       # being written or deleted (Ray keeps the 2 newest)
            continue
    return found


def test_a_lost_worker_node_the_run_finishes_on_the_head(cluster, tmp_path):
    # LAST in this module: the worker node does not come back. Ray's own CLI (`ray job submit`): the driver
    # and the Train controller sit on the head; the nodes' MLFLOW_TRACKING_URI and GRAFIT_STORAGE record it.
    from mlflow import MlflowClient
    train = ["grafit", "train", "jobs/smoke.yaml", "--set", "optim.epochs=3", "--set", "checkpoint.every_steps=1",
             "--set", "data.options.per_class=8"]                       # 96 images: 6 batches an epoch
    p = ray_job_submit(cluster, [*train, "--workers", "1-2", "--name", "lost-node"], {"OMP_NUM_THREADS": "1"},
                       wait=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", p.stdout + p.stderr).group(0)
    run_dir = cluster["state"] / "ray" / "storage" / "lost-node"
    deadline = time.time() + 400                 # in the middle of epoch 2
    while not any((e, b >= 2) == (1, True) or e >= 2 for e, b in progress_of(run_dir)):
        assert time.time() < deadline, "epoch 2 never started"
        time.sleep(0.1)
    assert max(progress_of(run_dir))[0] == 1, "the poll missed epoch 2"
    kill = subprocess.run([os.path.join(ROOT, "cluster", "local.sh"), "kill-node", "1"], env=cluster["env"],
                          capture_output=True, text=True, timeout=60)
    assert kill.returncode == 0 and "killed" in kill.stdout, kill.stdout + kill.stderr
    snapshot = {k: shutil.copytree(d, tmp_path / "snapshot" / os.path.basename(d))
                for k, d in progress_of(run_dir).items()}      # the checkpoints the survivor may resume from
    status = ""
    while status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline + 300, f"job {job_id} still {status}"
        time.sleep(2)
        _, job = api(cluster, f"/api/jobs/{job_id}", cluster["token"])
        status = job["status"]
    assert status == "SUCCEEDED", job

    client = MlflowClient(cluster["mlflow"])
    experiment = client.get_experiment_by_name("smoke").experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"tags.`grafit.storage` = '{run_dir}'")
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["ray.world_size"] == "1" and "," not in tags["ray.node_ids"]
    first = tags["ray.start.epoch0.batch0"]
    assert first.startswith("2 workers: ") and len(set(first[len("2 workers: "):].split(","))) == 2  # both nodes
    (restart, value), = [(k, v) for k, v in tags.items() if k.startswith("ray.start.")
                         and k != "ray.start.epoch0.batch0"]
    done, batches = map(int, re.fullmatch(r"ray\.start\.epoch(\d+)\.batch(\d+)", restart).groups())
    assert (done, batches >= 2) == (1, True) and value.startswith("1 workers: ")   # inside epoch 2, on the head
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size")] == [(0, 2), (1, 1)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]   # each epoch once

    # the reference: --workers 1 resumed from the same checkpoint, on the head alone
    ref_dir = tmp_path / "ref" / "lost-node"
    shutil.copytree(snapshot[done, batches], ref_dir / os.path.basename(snapshot[done, batches]))
    p = ray_job_submit(cluster, [*train, "--workers", "1", "--name", "lost-node", "--storage-path",
                                 str(tmp_path / "ref")], {"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    (ref,) = client.search_runs([experiment], filter_string=f"tags.`grafit.storage` = '{ref_dir}'")
    timing = ("epoch_time_s", "images_per_s")
    assert {k: v for k, v in run.data.metrics.items() if k not in timing} == \
        {k: v for k, v in ref.data.metrics.items() if k not in timing}
    assert {"knn_top1/l2", "map_cosine/l2"} <= run.data.metrics.keys()
