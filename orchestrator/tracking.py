"""MLflow tracking: runs, params, per-epoch and final metrics, artifacts, provenance.

The driver (a `grafit train` or one Tune trial) creates the run and always closes it
(FINISHED or FAILED, never left RUNNING); rank 0 of the Train workers logs into it by id.
The default store is `sqlite:///<cwd>/mlflow.db` (MLflow 3 refuses the ./mlruns file store),
or MLFLOW_TRACKING_URI.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess

from grafit_core.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("torch", "torchvision", "numpy", "ray", "mlflow", "grafit-ray")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{os.path.abspath('mlflow.db')}"


CREDENTIALS = "GRAFIT_MLFLOW_CREDENTIALS"   # the path of an MLflow credentials file (cluster/mlflow_server.sh)


def use_credentials() -> tuple[str, str] | None:
    """(user, password) from the file GRAFIT_MLFLOW_CREDENTIALS names (the format of MLflow's
    ~/.mlflow/credentials), put in this process's environment for MLflow's client: a file path
    travels to the workers, never the password (a job's runtime_env is stored and shown by Ray).
    Unset, empty or no such file: MLflow's own MLFLOW_TRACKING_USERNAME / _PASSWORD, if any."""
    path = os.environ.get(CREDENTIALS)
    if path and os.path.isfile(path):
        import configparser
        parser = configparser.RawConfigParser()           # a password may hold any character
        parser.read(path)
        if parser.has_option("mlflow", "mlflow_tracking_password"):
            os.environ.update(MLFLOW_TRACKING_USERNAME=parser.get("mlflow", "mlflow_tracking_username",
                                                                   fallback="admin"),
                              MLFLOW_TRACKING_PASSWORD=parser.get("mlflow", "mlflow_tracking_password"))
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None


def check_server(uri: str) -> None:
    """An MLflow server that does not answer, or refuses our credentials, is refused before any
    training starts (its /health answers anyone: the probe is an authenticated endpoint)."""
    from grafit_core.errors import GrafitError
    if not wait_for_server(uri, 0):
        raise GrafitError(f"MLflow tracking server {uri} does not answer; start it (cluster/mlflow_server.sh "
                          f"start) or point MLFLOW_TRACKING_URI elsewhere; nothing was started")
    status = api_status(uri)
    if status in (401, 403):
        path = os.environ.get(CREDENTIALS)
        given = (f"the credentials in {path}" if path and os.path.isfile(path) else
                 f"a request without credentials ({CREDENTIALS}={path}: no such file)" if path else
                 f"a request without credentials ({CREDENTIALS} is not set)")
        raise GrafitError(f"MLflow tracking server {uri} refused {given} (HTTP {status}): set {CREDENTIALS} to the "
                          f"credentials file its cluster/mlflow_server.sh wrote; nothing was started")


def api_status(uri: str) -> int:
    """The HTTP status of an authenticated read, with the credentials MLflow's client will send
    (200 for a local store)."""
    import base64
    import urllib.error
    import urllib.request
    if not uri.startswith(("http://", "https://")):
        return 200
    req = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    credentials, token = use_credentials(), os.environ.get("MLFLOW_TRACKING_TOKEN")
    if credentials:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(credentials).encode()).decode())
    elif token:
        req.add_header("Authorization", f"Bearer {token}")
    try:                                      # patient: a server just started answers its first request slowly
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError as err:                    # reached /health a moment ago: say what failed, in one line
        from grafit_core.errors import GrafitError
        raise GrafitError(f"MLflow tracking server {uri}: {err}; nothing was started") from None


def wait_for_server(uri: str, timeout: float) -> bool:
    """Poll an MLflow server's /health up to `timeout` s (True at once for a local store)."""
    import time
    import urllib.request
    deadline = time.time() + timeout
    while uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5 if timeout else 10).read()
            return True
        except OSError:
            if time.time() > deadline:
                return False
            time.sleep(2)
    return True


def client(uri: str):
    from mlflow.tracking import MlflowClient
    if uri.startswith(("http://", "https://")):
        use_credentials()
    return MlflowClient(tracking_uri=uri)


def refused(err: Exception) -> bool:
    """The server refused the credentials (401 / 403; an artifact upload's requests error too):
    retrying cannot help."""
    status = getattr(err, "get_http_status_code", lambda: None)()
    return status in (401, 403) or getattr(getattr(err, "response", None), "status_code", None) in (401, 403)


def artifact_root(uri: str) -> str | None:
    """With a sqlite store, artifacts go beside the database (mlartifacts/), not into ./mlruns of
    whichever directory a process happens to run in; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:                       # the UI shows a "custom model development" experiment's runs table
        return c.create_experiment(name, artifact_location=artifact_root(uri), tags={EXPERIMENT_KIND: MODEL_TRAINING})
    if exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return exp.experiment_id


EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
LOCAL_UI = "http://127.0.0.1:5000"            # where `grafit ui` serves a local store


def ui_link(uri: str, run_id: str, experiment: bool = False) -> str:
    """The run (or its experiment's runs table) in MLflow's model-training view: MLflow 3.17's UI
    takes the view from the URL, else from the browser's last choice, else opens the GenAI view."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    try:
        exp = client(uri).get_run(run_id).info.experiment_id
    except Exception:                         # the server is away: the UI's home page, in the same view
        return f"{base}/#/?workflowType=machine_learning"
    return f"{base}/#/experiments/{exp}{'' if experiment else f'/runs/{run_id}'}?workflowType=machine_learning"


def where(uri: str, run_id: str, what: str, experiment: bool = False) -> str:
    """The last line a command prints: where its run is and the link that opens it."""
    start = "" if uri.startswith(("http://", "https://")) else " (start the UI first: .venv/bin/grafit ui)"
    return f"MLflow {what} {run_id} in {uri}; open: {ui_link(uri, run_id, experiment)}{start}"


def flatten(d: dict) -> dict:
    """{"method": {"sigma": 0.05}} -> {"method.sigma": "0.05"} (MLflow params are strings)."""
    from grafit_core.config import flatten_dict
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten_dict(d).items()}


def provenance(dataset_fingerprint: str) -> dict:
    """Tags that say what produced a run: code version, packages, data."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    tags = {"git.commit": git("rev-parse", "HEAD") or "unknown",
            "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
            "dataset.fingerprint": dataset_fingerprint}
    if os.environ.get("GRAFIT_JOB_FILE"):     # a submitted job: the job file it was resolved from
        tags["grafit.job_file"] = os.environ["GRAFIT_JOB_FILE"]
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags


def common_folder(collections) -> str:
    """The deepest folder that holds every file of the file collections (streamed: no list of paths)."""
    root = None
    for coll in collections:
        for p in getattr(coll, "paths", None) or ():
            root = os.path.dirname(p) if root is None else root
            while not p.startswith(root.rstrip(os.sep) + os.sep) and root != os.path.dirname(root):
                root = os.path.dirname(root)
    return root or ""


def dataset_fingerprint(*collections) -> str:
    """sha256 over each collection's file list (relative to their common folder: data.root may move)
    and sizes (file datasets) or pixels (in memory)."""
    h, root = hashlib.sha256(), common_folder(collections)
    for coll in collections:
        paths = getattr(coll, "paths", None)
        if paths is not None:
            for p in paths:
                try:
                    size = os.path.getsize(p)
                except OSError as err:   # data.check_sample opens a sample only: a missing file shows here
                    raise DataError(f"{coll.name}: image {p}: {err.strerror}") from None
                h.update(f"{os.path.relpath(p, root)}\0{size}\n".encode())
        else:
            h.update(coll.images.numpy().tobytes() if hasattr(coll, "images") else coll.name.encode())
        for level in sorted(coll.labels):
            h.update(coll.labels[level].tobytes())
    return h.hexdigest()[:16]


def start_run(uri: str, experiment: str, run_name: str, cfg_dict: dict, tags: dict,
              parent_run_id: str | None = None) -> str:
    """Create a RUNNING run with the flattened config as params; returns its id."""
    c = client(uri)
    tags = dict(tags)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
    from mlflow.entities import Param
    items = [Param(k, v[:6000]) for k, v in sorted(flatten(cfg_dict).items())]
    try:
        for i in range(0, len(items), 100):
            c.log_batch(run.info.run_id, params=items[i:i + 100])
    except Exception:
        c.set_terminated(run.info.run_id, status="FAILED")   # never left RUNNING
        raise
    return run.info.run_id


def resumable_run(uri: str, experiment: str, storage_key: str, finished_too: bool = False) -> tuple[str | None, int]:
    """The unfinished run (RUNNING after a killed driver, FAILED, KILLED) that trained into
    `storage_key` (storage path / run name), and the last epoch it logged: a resumed training
    continues that run, so its history has no gap and no repeated step. finished_too: a FINISHED
    run too (a sweep's trial is one run, even when its driver died between closing it and
    recording that it finished)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None, 0
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`grafit.storage` = '{storage_key}'",
                         order_by=["attribute.start_time DESC"], max_results=1)
    if not runs or (runs[0].info.status == "FINISHED" and not finished_too):
        return None, 0
    run_id = runs[0].info.run_id
    steps = [m.step for m in c.get_metric_history(run_id, "epoch")]
    c.update_run(run_id, status="RUNNING")
    return run_id, max(steps, default=0)


def write_embeddings(shard, offset: int, train, max_mb: float, path: str) -> bool:
    """The collection's embeddings as Parquet with the labels at every level, one row per item;
    each rank writes the rows it owns as one part file (atomically: temporary name, then rename).
    Skipped above max_mb (whole collection)."""
    if len(train) * shard.shape[1] * 4 / 2**20 > max_mb:
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = {"index": pa.array(range(offset, offset + len(shard)), pa.int64()),
               "embedding": pa.array(shard.cpu().numpy().tolist(), pa.list_(pa.float32()))}
    for level in train.hierarchy.levels:
        columns[f"label_{level}"] = pa.array(train.labels_at(level)[offset:offset + len(shard)], pa.int64())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)
    return True
