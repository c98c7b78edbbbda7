"""MLflow logging that never blocks training: a journal on disk and a sender thread.

Every record (a step's metrics, tags, a dict, an artifact file, the run's end) is first appended
to a local JSON-lines journal, then sent in order by a background thread that retries while the
tracking server is away. Training only appends: a server that dies mid-run delays the records,
never the steps. Records still unsent when a process ends stay in the journal; the driver replays
the workers' journals after training (`replay`), and `grafit sync DIR` replays whatever is left.
`<journal>.sent` holds the last sequence number the server acknowledged.
"""
from __future__ import annotations

import glob
import json
import os
import queue
import tempfile
import threading
import time

RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)


def _quiet_client_retries() -> None:
    # MLflow's own HTTP retries would hold one request for minutes; the journal retries instead
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def last_sent(path: str) -> int:
    try:
        with open(path + ".sent") as f:
            return int(f.read().strip() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def _mark_sent(path: str, seq: int) -> None:
    tmp = f"{path}.sent.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(seq))
    os.replace(tmp, path + ".sent")


def _repair(path: str) -> None:
    """Cut a last line left half-written by a killed writer, so that new records start clean."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def records(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:      # a line cut by a killed writer: everything before it counts
                break
    return out


END_RANK = {"FAILED": 0, "KILLED": 1, "FINISHED": 2}


def send(rec: dict, *, replaying: bool = False) -> None:
    """One record to its run. A replayed metrics record already on the server is not sent twice."""
    from mlflow.entities import Metric
    from orchestrator.tracking import client
    c, run_id, kind = client(rec["uri"]), rec["run_id"], rec["kind"]
    if kind == "metrics":
        items = [Metric(k, v, rec["time"], rec["step"]) for k, v in sorted(rec["metrics"].items())]
        # the same record (step and time): a new value at an old step (a rerun's best/*) is sent
        if replaying and items and any((m.step, m.timestamp) == (rec["step"], rec["time"])
                                       for m in c.get_metric_history(run_id, items[0].key)):
            return
        for i in range(0, len(items), 500):
            c.log_batch(run_id, metrics=items[i:i + 500])
    elif kind == "tags":
        for key, value in rec["tags"].items():
            c.set_tag(run_id, key, value)
    elif kind == "dict":
        c.log_dict(run_id, rec["data"], rec["name"])
    elif kind in ("artifact", "artifacts"):
        if not os.path.exists(rec["local"]):    # gone (pruned, overwritten): it can never be sent
            print(f"grafit: journal: {rec['local']} no longer exists; artifact {rec['dest']} skipped")
            return
        (c.log_artifact if kind == "artifact" else c.log_artifacts)(run_id, rec["local"], rec["dest"])
    elif kind == "end":
        # a closed run's status only moves up, FAILED -> KILLED -> FINISHED, whatever the order the
        # ends arrive in: the late FAILED of a trial driver its sweep stopped (ASHA, Ctrl-C) leaves it
        # KILLED; a FINISHED left in a journal still wins over a KILLED or a stale FAILED sent before
        # it. Only a reopened (RUNNING) run takes any end.
        now = c.get_run(run_id).info.status
        if now == "RUNNING" or END_RANK.get(rec["status"], -1) > END_RANK.get(now, -1):
            c.set_terminated(run_id, status=rec["status"])
    else:
        raise ValueError(f"unknown journal record {kind!r}")


class Journal:
    """Append-only log of one process's MLflow records, sent by a daemon thread."""

    def __init__(self, uri: str, run_id: str, path: str, send_now: bool = True):
        """send_now=False only appends (records that must wait for other journals: `grafit sync`)."""
        _quiet_client_retries()
        self.uri, self.run_id, self.path = uri, run_id, path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _repair(path)
        old = records(path) if os.path.exists(path) else []
        self.seq = old[-1]["seq"] + 1 if old else 0
        self.queue: queue.Queue = queue.Queue()
        self.deadline = float("inf")
        self.abandoned = False
        self.sent = last_sent(path)               # written by the sender thread only
        for rec in old:                           # what an earlier process left unsent goes first
            if rec["seq"] > self.sent:
                self.queue.put(rec)
        self.thread = threading.Thread(target=self._loop, name="mlflow-journal", daemon=True)
        if send_now:
            self.thread.start()

    def record(self, kind: str, run_id: str | None = None, **data) -> None:
        rec = {"seq": self.seq, "uri": self.uri, "run_id": run_id or self.run_id, "kind": kind, **data}
        self.seq += 1
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.queue.put(rec)

    def log_metrics(self, metrics: dict, step: int, epoch: bool = False, run_id: str | None = None) -> None:
        """epoch=True marks a per-epoch record: a restarted worker logs each epoch once."""
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        self.record("metrics", run_id, metrics=clean, step=int(step), time=int(time.time() * 1000), epoch=epoch)

    def epochs_logged(self) -> int:
        """The last epoch this journal holds (sent or not): 0 for a fresh one."""
        done = [r["step"] for r in records(self.path) if r["kind"] == "metrics" and r.get("epoch")
                and r["run_id"] == self.run_id] if os.path.exists(self.path) else []
        return max(done, default=0)

    def set_tags(self, tags: dict) -> None:
        self.record("tags", tags={k: str(v) for k, v in tags.items()})

    def log_dict(self, data: dict, name: str) -> None:
        self.record("dict", data=data, name=name)

    def log_artifact(self, local: str, dest: str) -> None:
        self.record("artifact", local=os.path.abspath(local), dest=dest)

    def log_artifacts(self, local_dir: str, dest: str) -> None:
        self.record("artifacts", local=os.path.abspath(local_dir), dest=dest)

    def end(self, ok: bool | str, run_id: str | None = None) -> None:
        """ok: True (FINISHED), False (FAILED) or a status (KILLED); run_id: another run (a child)."""
        self.record("end", run_id, status=ok if isinstance(ok, str) else "FINISHED" if ok else "FAILED")

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the records to reach the server; True if they all did.
        What is left stays in the file (the sender stops: a later replay owns it)."""
        if not self.thread.is_alive():
            return self.sent == self.seq - 1
        self.deadline = time.time() + timeout
        self.queue.put(None)
        self.thread.join(timeout + 1)
        self.abandoned = True
        return self.sent == self.seq - 1

    def _loop(self) -> None:
        while (rec := self.queue.get()) is not None:
            if not deliver(self.path, rec, lambda: self.deadline, stop=lambda: self.abandoned):
                return
            self.sent = rec["seq"]


class Echo(threading.Thread):
    """Prints each per-epoch record a journal receives, one line each, as it is written: the
    driver's view of a run's epochs (the workers' own output stays in Ray's logs without --verbose).
    Records already there when it starts (a resumed run) are not repeated."""

    def __init__(self, path: str, label: str, epochs: int):
        super().__init__(name="epoch-echo", daemon=True)
        self.path, self.label, self.epochs = path, label, epochs
        self.seen = len(records(path)) if os.path.exists(path) else 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.flush()
        self.flush()

    def stop(self) -> None:
        self.done.set()
        self.join(5)

    def flush(self) -> None:
        new = records(self.path)[self.seen:] if os.path.exists(self.path) else []
        self.seen += len(new)
        for rec in new:
            if rec["kind"] == "metrics" and rec.get("epoch"):
                shown = ", ".join(f"{k}={v:.4g}" for k, v in rec["metrics"].items() if k != "epoch")
                print(f"{self.label} epoch {rec['step']}/{self.epochs}: {shown}", flush=True)


def deliver(path: str, rec: dict, deadline, stop=lambda: False, replaying: bool = False) -> bool:
    """Send one record, retrying while the server is away, until deadline() passes; mark it sent."""
    from orchestrator.tracking import CREDENTIALS, refused
    tries = 0
    while not stop():
        try:
            send(rec, replaying=replaying)
            _mark_sent(path, rec["seq"])
            return True
        except Exception as err:                            # server away: wait, retry
            if refused(err):                                # ... but not a refusal of our credentials
                print(f"grafit: MLflow server {rec['uri']} refused the credentials ({CREDENTIALS}): the records "
                      f"stay in {path}; grafit sync sends them once {CREDENTIALS} is right", flush=True)
                return False
            if time.time() > deadline():
                return False
            time.sleep(RETRY_S[min(tries, len(RETRY_S) - 1)])
            tries += 1
    return False


def replay(path: str, timeout: float) -> bool:
    """Send a journal's unsent records in order, retrying up to `timeout` s; True if none is left."""
    _quiet_client_retries()
    _repair(path)
    deadline, done = time.time() + timeout, last_sent(path)
    return all(deliver(path, rec, lambda: deadline, replaying=True) for rec in records(path) if rec["seq"] > done)


def local_dir(storage_key: str, run_id: str) -> str:
    """Where a run's journals live: beside its checkpoints, or in /tmp for a remote storage URI."""
    return (os.path.join(storage_key, "mlflow_journal") if "://" not in storage_key else
            os.path.join(tempfile.gettempdir(), "grafit-journal", run_id))


DRIVER = "driver.jsonl"      # the driver's records (checkpoint, the run's end) go after the workers'


def replay_all(directory: str, timeout: float, drivers: bool = True) -> bool:
    """Replay every journal under `directory` within one deadline: in each run's folder the
    workers' journals first, its driver's (checkpoint, the run's end) only once they are through."""
    deadline, ok = time.time() + timeout, True
    blocked = set()
    for path in unsent(directory):
        folder = os.path.dirname(path)
        if os.path.basename(path) == DRIVER and (not drivers or folder in blocked):
            continue
        if not replay(path, max(0.0, deadline - time.time())):
            ok = False
            blocked.add(folder)
    return ok and not any(os.path.basename(p) != DRIVER or drivers for p in unsent(directory))


def unsent(directory: str) -> list[str]:
    """Journals under `directory` with records the server has not acknowledged, workers' first."""
    found = sorted(glob.glob(os.path.join(directory, "**", "*.jsonl"), recursive=True),
                   key=lambda p: (os.path.dirname(p), os.path.basename(p) == DRIVER, p))
    return [p for p in found if records(p) and records(p)[-1]["seq"] > last_sent(p)]
