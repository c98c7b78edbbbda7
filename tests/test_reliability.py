"""Failure modes refused before any cluster resource is taken (issue 8)."""
import os
import socket

import pytest

from orchestrator.cli import main as grafit

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
