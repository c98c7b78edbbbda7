"""Jobs on a running Ray cluster: `grafit submit JOB.yaml --address http://HEAD:8265` and
`grafit jobs list|status|logs|stop`.

A job spec names the grafit command to run on the cluster (train, sweep or matrix), its job file,
flags, config overrides and Ray runtime environment (see jobs/submit/). A plain job file is also
accepted and runs as the command its sections imply. Everything is validated here first, with the
same checks the command itself runs (`--check`), so a bad spec starts nothing on the cluster. The
project folder is uploaded as the job's working dir, with the job file resolved into one
self-contained YAML (includes merged, the spec's overrides applied, paths absolute), so a job file
may live in any folder; every node must reach the data, the checkpoint storage and the MLflow
server. The cluster's auth token is sent as a bearer token.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import shlex
import sys
import time

import yaml

from grafit_core.config import read_yaml
from grafit_core.errors import ConfigError, GrafitError
from orchestrator import tracking
from orchestrator.job import blamed, job_dict, load_job
from orchestrator.prepare import RUN_COMMANDS, add_run_flags, format_table, prepare
from orchestrator.sweep import check_definition

ROOT = tracking.ROOT
KINDS = tuple(RUN_COMMANDS)
SPEC_KEYS = ("kind", "config", "options", "set", "runtime_env", "entrypoint_num_cpus")
# what never travels with the working dir: environments, local runs and stores
EXCLUDES = [".git", ".venv", "runs", "mlflow.db", "mlartifacts", "mlruns", "__pycache__", "*.egg-info",
            ".pytest_cache"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RESOLVED = ".submit"                           # resolved job files, in the project while they are uploaded
ENTRYPOINT = "python -m orchestrator.cli "   # + the grafit command's arguments


def load_spec(path: str) -> dict:
    """The spec as {kind, config (absolute), options, set, runtime_env, entrypoint_num_cpus}."""
    data = read_yaml(path)
    if "kind" not in data and "config" not in data:       # a plain job file: run it as it is
        kind = "matrix" if data.get("matrix") else "sweep" if (data.get("sweep") or {}).get("space") else "train"
        data = {"kind": kind, "config": os.path.basename(path)}
    for key in data:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{path}: {key}: unknown key (a job spec has {', '.join(SPEC_KEYS)})")
    if data.get("kind") not in KINDS:
        raise ConfigError(f"{path}: kind: {data.get('kind')!r} is not one of {', '.join(KINDS)}")
    if not isinstance(data.get("config"), str):
        raise ConfigError(f"{path}: config: expected the path of a job file, relative to this spec")
    for key in ("options", "set", "runtime_env"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping")
    config = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), data["config"]))
    return {"kind": data["kind"], "config": config, "options": dict(data.get("options") or {}),
            "set": dict(data.get("set") or {}), "runtime_env": dict(data.get("runtime_env") or {}),
            "entrypoint_num_cpus": data.get("entrypoint_num_cpus", 0)}


@contextlib.contextmanager
def resolved_job(spec: dict, path: str):
    """The job file as one self-contained YAML inside the project while it is uploaded with the job:
    includes merged, the spec's `set` applied, data.root and finetune.checkpoint absolute. Yields its
    path and where each key came from (Job.origins); removed afterwards (uploaded, or refused: no
    copy stays behind)."""
    job = load_job(spec["config"], spec["set"], set_where=f"{path}: set.")   # errors name the file and key
    text = (f"# {spec['config']}, resolved by grafit submit {os.path.abspath(path)}: includes merged, the spec's "
            f"set applied, paths absolute\n" + yaml.safe_dump(job_dict(job), sort_keys=False))
    unique = hashlib.sha256(f"{text}{os.getpid()}{time.time()}".encode()).hexdigest()[:10]   # one per submission
    out = os.path.join(ROOT, RESOLVED, f"{job.config.name}-{unique}.yaml")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.replace(out + ".tmp", out)
    try:
        yield out, job.origins
    finally:
        os.remove(out)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(out))


def command_argv(spec: dict, path: str, storage: str, resolved: str) -> list[str]:
    """The `grafit` arguments the job runs: the resolved job file, the spec's options, the storage."""
    argv = [spec["kind"], os.path.relpath(resolved, ROOT)]
    for key, value in spec["options"].items():
        if key in ("storage_path", "ray_address", "check"):
            raise ConfigError(f"{path}: options.{key}: set by grafit submit (storage: --storage-path or "
                              f"GRAFIT_STORAGE)")
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv + ["--ray-address", "auto", "--storage-path", storage]


def check_locally(argv: list[str], path: str) -> None:
    """Parse the flags as the command will and run its own preparation (`prepare`)."""
    kind = argv[0]
    parser = add_run_flags(argparse.ArgumentParser(prog=f"grafit {kind}"), kind)

    def refuse(message):                      # argparse's own message, without usage and exit
        raise ConfigError(f"{path}: options: {message}")

    parser.error = refuse
    args = parser.parse_args(argv[1:])
    args.config = os.path.join(ROOT, args.config)
    prep = prepare(kind, args)
    if kind in ("sweep", "matrix"):           # where a sweep resumes from, refused here too
        check_definition(prep.job, args.storage_path, prep.fingerprint)


def storage_path(spec: dict, flag: str | None, path: str) -> str:
    in_spec = spec["options"].pop("storage_path", None)
    if in_spec and "://" not in in_spec:       # relative to the spec, like its config
        in_spec = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(in_spec))
    storage = flag or in_spec or os.environ.get("GRAFIT_STORAGE")
    if not storage:
        raise ConfigError(f"{path}: no checkpoint storage: give --storage-path or GRAFIT_STORAGE, a folder "
                          f"every node reaches (NFS) or a URI such as s3://bucket/grafit")
    return storage if "://" in storage else os.path.abspath(storage)


def cluster_tracking_uri(spec: dict, flag: str | None, path: str) -> str:
    """--mlflow-uri, else the spec's runtime_env, else MLFLOW_TRACKING_URI."""
    uri = flag or (spec["runtime_env"].get("env_vars") or {}).get("MLFLOW_TRACKING_URI") \
        or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"{path}: no MLflow tracking server: give --mlflow-uri or MLFLOW_TRACKING_URI "
                          f"(start one with cluster/mlflow_server.sh start)")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ConfigError(f"{path}: MLFLOW_TRACKING_URI {uri}: a relative sqlite path would resolve in the "
                          f"job's working dir on the cluster; use an absolute path or a server")
    tracking.check_server(uri)
    return uri


def auth_headers(token_file: str | None) -> dict:
    """The cluster's token: --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN") if not token_file else None
    named = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and named:
        if not os.path.isfile(named):
            raise GrafitError(f"{'--token-file' if token_file else 'RAY_AUTH_TOKEN_PATH'} {named}: no such file")
        token = open(named).read().strip()
    default = os.path.expanduser("~/.ray/auth_token")
    if not token and not named and os.path.isfile(default):
        token = open(default).read().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_server(address: str, token_file: str | None):
    from ray.job_submission import JobSubmissionClient
    with explained(address):
        return JobSubmissionClient(address, headers=auth_headers(token_file))


@contextlib.contextmanager
def explained(address: str):
    """A refused token or an unreachable job server as one line instead of a traceback."""
    from ray.exceptions import AuthenticationError
    try:
        yield
    except AuthenticationError as err:
        raise GrafitError(f"job server {address} refused the request ({str(err).splitlines()[0]}); give the "
                          f"cluster's token with --token-file, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") from None
    except ConnectionError as err:
        raise GrafitError(f"job server {address}: {str(err).splitlines()[0]}") from None


async def stream_logs(jobs, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def cmd_submit(args) -> int:
    path = args.spec
    spec = load_spec(path)
    storage = storage_path(spec, args.storage_path, path)
    with resolved_job(spec, path) as (resolved, origins):
        argv = command_argv(spec, path, storage, resolved)
        # the checks run on the resolved copy; their errors name the job file, the included one, or the spec's set
        with blamed(resolved, origins, shown=spec["config"], set_where=f"{path}: set."):
            check_locally(argv, path)                        # nothing is started on a failure
        uri = cluster_tracking_uri(spec, args.mlflow_uri, path)
        job_id, entrypoint, jobs = submit(args, spec, argv, uri, path)
    print(f"submitted {job_id} to {args.address}: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"follow it with: grafit jobs logs {job_id} --address {args.address}")
        return 0
    try:
        asyncio.run(stream_logs(jobs, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: grafit jobs stop {job_id}", file=sys.stderr)
        return 130
    status = jobs.get_job_status(job_id)
    print(f"job {job_id}: {status.value}")
    return 0 if status.value == "SUCCEEDED" else 1


def submit(args, spec: dict, argv: list[str], uri: str, path: str):
    """Send the job (the project folder, with the resolved job file, is uploaded now)."""
    env = dict(spec["runtime_env"])
    own = env.pop("env_vars", None) or {}
    secret = [k for k in own if re.search(r"SECRET|PASSWORD|TOKEN|(^|_)KEY$", k.upper())
              and not k.upper().endswith(("_PATH", "_FILE"))]
    if secret or re.match(r"^https?://[^/]*@", uri):  # Ray stores a job's runtime_env and shows it in its dashboard
        where = f"runtime_env.env_vars.{secret[0]}" if secret else f"MLFLOW_TRACKING_URI {uri.split('@')[-1]}"
        raise ConfigError(f"{path}: {where}: a secret in a job's environment is stored and shown by Ray; give a "
                          f"file path instead ({tracking.CREDENTIALS}, RAY_AUTH_TOKEN_PATH), read on the nodes")
    # the nodes' own GRAFIT_MLFLOW_CREDENTIALS (cluster/local.sh, the KubeRay pods) holds: not this machine's path
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHONUNBUFFERED": "1", **own, "MLFLOW_TRACKING_URI": uri,
                "GRAFIT_JOB_FILE": spec["config"]}        # where the job came from: a tag of its runs
    runtime_env = {"working_dir": ROOT, "excludes": EXCLUDES, **env, "env_vars": env_vars}
    entrypoint = ENTRYPOINT + shlex.join(argv)
    jobs = job_server(args.address, args.token_file)
    deadline = time.time() + 120
    while True:
        try:
            with explained(args.address):
                job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                         entrypoint_num_cpus=spec["entrypoint_num_cpus"],
                                         metadata={"grafit_spec": os.path.abspath(path),
                                                   "grafit_job_file": spec["config"]})
            return job_id, entrypoint, jobs
        except RuntimeError as err:      # a node just started: its job agent registers a little later
            if "No available agent" not in str(err) or time.time() > deadline:
                raise GrafitError(f"job server {args.address}: {str(err).splitlines()[0]}") from None
            time.sleep(2)


def cmd_jobs(args) -> int:
    with explained(args.address):
        return jobs_action(job_server(args.address, args.token_file), args)


def job_rows(listed, now_ms: float) -> list[dict]:
    """`grafit jobs list`: newest first, with submission time, duration, status and the grafit command."""
    rows = []
    for job in sorted(listed, key=lambda j: -(j.start_time or 0)):
        start, end = job.start_time or 0, job.end_time or now_ms
        seconds = max(0, int((end - start) / 1000)) if start else 0
        command = job.entrypoint.replace(ENTRYPOINT, "grafit ", 1) if job.entrypoint else "-"
        rows.append({"submitted": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1000)) if start else "-",
                     "duration": f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s",
                     "status": job.status.value, "id": job.submission_id or job.job_id, "command": command})
    return rows


def jobs_action(jobs, args) -> int:
    if args.action == "list":
        print(format_table(job_rows(jobs.list_jobs(), time.time() * 1000),
                           ["submitted", "duration", "status", "id", "command"]))
        return 0
    if not args.id:
        raise GrafitError(f"grafit jobs {args.action}: give the job's submission id")
    if args.action == "status":
        print(jobs.get_job_status(args.id).value)
    elif args.action == "logs":
        if args.follow:
            asyncio.run(stream_logs(jobs, args.id))
        else:
            print(jobs.get_job_logs(args.id), end="")
    else:
        print("stopped" if jobs.stop_job(args.id) else "not running")
    return 0


def add_parsers(sub) -> None:
    def common(p):
        p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", DEFAULT_ADDRESS)
                       if os.environ.get("RAY_ADDRESS", "").startswith("http") else DEFAULT_ADDRESS,
                       help=f"the cluster's job server (default RAY_ADDRESS if it is a URL, else {DEFAULT_ADDRESS})")
        p.add_argument("--token-file", default=None,
                       help="the cluster's auth token (default RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")

    p = sub.add_parser("submit", help="validate a job spec here, then run it on a Ray cluster's job server")
    p.add_argument("spec", help="a job spec (jobs/submit/*.yaml) or a plain job file")
    common(p)
    p.add_argument("--storage-path", default=None,
                   help="checkpoints, reachable by every node: a shared folder or s3://... "
                        "(default: the spec's options.storage_path, else GRAFIT_STORAGE)")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking server the job logs to (default: the spec's env, else MLFLOW_TRACKING_URI)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of streaming logs")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect or stop jobs on a Ray cluster")
    p.add_argument("action", choices=["list", "status", "logs", "stop"], help="what to do")
    p.add_argument("id", nargs="?", default=None, help="the job's submission id (not for list)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    common(p)
    p.set_defaults(func=cmd_jobs)
