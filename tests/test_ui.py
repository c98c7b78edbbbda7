"""The MLflow UI really shows a matrix run: a real tiny `grafit matrix`, `grafit ui` on 127.0.0.1,
the run's artifact page rendered by headless Chromium, the heatmap asserted from the DOM."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--virtual-time-budget=15000"]
JOB = {"name": "ui-matrix",
       "data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
       "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
       "optim": {"epochs": 1, "batch_size": 16},
       "eval": {"val_size": 20, "k_candidates": [3, 5]},
       "matrix": {"methods": ["grafit", "ce"], "train_levels": ["l0"]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


@pytest.mark.timeout(600)
def test_mlflow_ui_shows_the_matrix_heatmap(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: .ci/run installs Debian's chromium (apt-get install chromium)"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    job = tmp_path / "matrix.yaml"
    job.write_text(yaml.safe_dump(JOB))
    grafit = [sys.executable, "-m", "orchestrator.cli"]
    run = subprocess.run([*grafit, "matrix", str(job), "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "== knn_top1 (%) of grafit" in run.stdout and "grafit ui" in run.stdout
    link = run.stdout.split("open: ")[-1].split()[0]      # the link the command printed
    assert link.endswith("?workflowType=machine_learning"), link

    from mlflow.tracking import MlflowClient
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("ui-matrix")
    parent = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags][0]
    figs = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/retrieval_grid.png", "figures/tsne.png", "figures/heatmap_knn_top1_ce.png",
            "figures/levels_knn_top1.png"} <= figs

    port = free_port()
    ui = subprocess.Popen([*grafit, "ui", "--port", str(port)], cwd=ROOT, env=env, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120)
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
        page = (f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
                f"/artifacts/figures/heatmap_knn_top1_grafit.png")
        profile = tmp_path / "chromium-profile"
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page],
                             capture_output=True, text=True, timeout=120).stdout
        assert "heatmap_knn_top1_grafit.png" in dom, dom[-2000:]
        shot = tmp_path / "mlflow_ui.png"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", page],
                       capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 10_000
        # the printed link, in a browser that never chose a view: the experiment's runs table
        fresh = tmp_path / "fresh-profile"
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={fresh}", "--dump-dom",
                              link.replace("127.0.0.1:5000", f"127.0.0.1:{port}")],
                             capture_output=True, text=True, timeout=120).stdout
        text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())   # what the page reads
        total = len(client.search_runs([exp.experiment_id]))  # the parent and its cells (collapsed under it)
        assert "Model training" in text and "Run Name" in text and parent.info.run_name in text, text[-3000:]
        assert f"{total} matching runs" in text, text[-3000:]
        os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
        shutil.copy(shot, os.path.join(ROOT, "runs", "mlflow_ui_matrix.png"))   # kept for a person to look at
    finally:
        os.killpg(ui.pid, signal.SIGTERM)                 # the UI's whole process group (gunicorn workers)
        ui.wait(timeout=30)
