"""The cloud launcher YAML, the KubeRay manifests and the image they run: the fields Ray and
KubeRay require, and that they install and run this project's entrypoint."""
import json
import os
import shlex

import pytest
import yaml

ray = pytest.importorskip("ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")


def load(*parts):
    with open(os.path.join(CLUSTER, *parts)) as f:
        return list(yaml.safe_load_all(f))


def test_launcher_yaml_follows_rays_schema_and_installs_the_project():
    import jsonschema
    (cfg,) = load("aws.yaml")
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        jsonschema.validate(cfg, json.load(f))                      # Ray's own launcher schema
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["file_mounts"]["~/grafit"] == "."                    # this project travels to every node
    setup = " && ".join(cfg["setup_commands"])
    assert "pip install -q -r ~/grafit/requirements.txt" in setup and "pip install -q -e ~/grafit" in setup
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def check_ray_cluster_spec(spec: dict) -> None:
    """What KubeRay's RayCluster CRD requires, plus this project's choices."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        (container,) = group["template"]["spec"]["containers"]
        assert container["name"] and container["image"].endswith("/grafit:0.1")
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"] for v in group["template"]["spec"].get("volumes", [])}
        assert mounts <= volumes
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    ports = {p["name"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"gcs-server", "dashboard"} <= ports


def test_raycluster_manifest():
    (doc,) = load("kuberay", "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "grafit")
    check_ray_cluster_spec(doc["spec"])
    assert doc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_rayjob_manifest_runs_a_valid_grafit_command():
    from grafit_core.config import load_config
    from orchestrator.cli import build_parser
    (doc,) = load("kuberay", "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "grafit"                                      # the console script of pyproject.toml
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.ray_address == "auto"
    local = args.config.replace("/app/", ROOT + "/", 1)            # the image keeps the project in /app
    cfg = load_config(local)
    assert all(cfg.optim.batch_size % w == 0 for w in args.workers.sizes)
    assert "MLFLOW_TRACKING_URI" in yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]


def test_dockerfile_installs_the_project_on_the_matching_ray_image():
    lines = [x.strip() for x in open(os.path.join(CLUSTER, "Dockerfile")) if x.strip() and not x.startswith("#")]
    assert lines[0].startswith(f"FROM rayproject/ray:{ray.__version__}-py311")
    assert "WORKDIR /app" in lines
    run = " ".join(x for x in lines if x.startswith("RUN"))
    assert "pip install --no-cache-dir -r requirements.txt" in run and "pip install --no-cache-dir --no-deps ." in run
    assert "ap_kernel.kernel() is not None" in " ".join(lines)   # the AP loop is built into the image


def test_mlflow_manifest_serves_artifacts_inside_the_cluster():
    docs = {d["kind"]: d for d in load("kuberay", "mlflow.yaml")}
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert command.startswith("mlflow server") and "--artifacts-destination /mnt/grafit" in command
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    # authentication: the basic-auth app, its secret key and config from a Secret (never a literal)
    env = {e["name"]: e for e in container["env"]}
    assert "--app-name basic-auth" in command
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/etc/mlflow-auth/")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob.yaml"])
def test_ray_pods_read_mlflow_credentials_from_a_mounted_secret(manifest):
    (doc,) = load("kuberay", manifest)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert {"name": "mlflow-credentials", "secret": {"secretName": "mlflow-credentials"}} in pod["volumes"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "mlflow-credentials")
        path = next((e["value"] for e in container.get("env", []) if e["name"] == "GRAFIT_MLFLOW_CREDENTIALS"),
                    yaml.safe_load(doc["spec"].get("runtimeEnvYAML", "{}") or "{}").get("env_vars", {}).get(
                        "GRAFIT_MLFLOW_CREDENTIALS"))
        assert path.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    assert "MLFLOW_TRACKING_PASSWORD" not in open(os.path.join(CLUSTER, "kuberay", manifest)).read()


@pytest.mark.parametrize("script", ["local.sh", "mlflow_server.sh"])
def test_cluster_scripts_parse(script):
    import subprocess
    subprocess.run(["bash", "-n", os.path.join(CLUSTER, script)], check=True)
