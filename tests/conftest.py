"""Shared fixtures and the two lanes.

The fast lane (`pytest -m "not slow"`) is every test not marked slow: pure units that start no Ray and no
server. A guard holds it to that: in a test not marked slow, `ray.init` and listening on a socket fail the
test, so do the fixtures that start a cluster or a server, and a job started as a subprocess finds RAY_ADDRESS
pointing at a closed port (it fails, loudly, instead of starting a Ray). The slow lane shares what a fresh
copy would not prove more with: one embedded Ray for the in-process tests, one real training run for the
tests that read a run's outputs, one two-node cluster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

# Ray >= 2.59 turns token auth on for new local clusters unless told; the in-process clusters of these
# tests are loopback-only and say so explicitly. (The job-submission tests use token auth.)
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from clf import data, session  # noqa: E402
from tests.helpers import ROOT, imported_torch, listening_addresses  # noqa: E402

# Fixtures that start Ray or a server: a test using one belongs in the slow lane.
SLOW_FIXTURES = {"ray_local", "s3", "one_epoch", "cluster", "two_nodes", "served", "endpoint", "folder_run"}
# Where a fast test's subprocesses find "their cluster": nothing listens on the discard port.
NOWHERE = "127.0.0.1:9"


@pytest.fixture(autouse=True)
def fast_lane_guard(request, monkeypatch):
    """In a test not marked slow: no Ray, no server, no fixture that starts one."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    starters = SLOW_FIXTURES & set(request.fixturenames)
    if starters:
        pytest.fail(f"a fast test uses {', '.join(sorted(starters))}, which starts Ray or a server: mark it slow")
    import ray

    def refused(*args, **kwargs):
        raise AssertionError("a fast test started Ray or a server: mark it slow")

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(socket.socket, "listen", refused)
    monkeypatch.setenv("RAY_ADDRESS", NOWHERE)
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray on loopback for every in-process test of the session (2 CPUs, no dashboard), stopped at
    the end: only this process's own Ray."""
    import ray

    session.loopback_mode()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(**session.local_ray(), num_cpus=2, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3-compatible server on loopback (moto's server mode) for the whole session; its endpoint and dummy
    credentials are set in this process's environment, which the drivers and Ray clusters the tests start
    inherit (start a cluster after asking for this fixture)."""
    from tests.s3 import S3Server, environment_with

    server = S3Server(tmp_path_factory.getbasetemp() / "moto.log")
    restore = environment_with(server.env)
    try:
        yield server
    finally:
        restore()
        server.stop()


@pytest.fixture(scope="session")
def cluster(s3, tmp_path_factory):
    """The two-node rig, for the session: a head from `ray start` and a second node whose disk is its own (its
    private folders over the tests' folder and ~/ray_results), 2 CPUs each, token authentication on, both
    reaching the S3 server. The tests that use it leave it as they found it (no job or application running);
    stopped at the end, its own processes only."""
    from tests.ray_cluster import LocalCluster, not_shared

    c = LocalCluster(num_cpus=2).start()
    try:
        c.add_worker_node(num_cpus=2, private=not_shared(tmp_path_factory.getbasetemp()))
        yield c
    finally:
        c.stop()
    assert c.processes() == []


@pytest.fixture(scope="session")
def real_data() -> data.FashionMNIST:
    try:
        return data.load()
    except data.DataError as e:
        pytest.fail(f"the real Fashion-MNIST is needed for this test: {e}")


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """`jobs/train.py --epochs 1` on the real data, as a user runs it, with its embedded Ray; meanwhile every
    TCP port that the process and its descendants listen on, and every process it started, are recorded.
    Shared by the job's tests, the tracking tests (it tracks to an MLflow store of SQLite beside it) and the
    tagging and serving tests (which use its checkpoint)."""
    import psutil

    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    tracking_uri = f"sqlite:///{out.parent / 'mlflow.db'}"  # tracked as a user tracks it (tests/test_tracking.py)
    env = {k: v for k, v in os.environ.items() if k not in session.LOOPBACK_ENV and k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--epochs", "1", "--output", str(out), "--storage-path",
         str(out.parent / "ray"), "--tracking-uri", tracking_uri],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen = {"stdout": [], "stderr": []}  # (when it came, in seconds of time.monotonic(), the line)

    def read(stream, lines):
        for line in stream:
            lines.append((time.monotonic(), line))

    readers = [threading.Thread(target=read, args=(getattr(proc, name), lines), daemon=True) for name, lines in seen.items()]
    for reader in readers:
        reader.start()
    listening, started, titles, predictors = set(), {}, {}, {}  # titles: every name a process was seen under
    polls = 0
    while proc.poll() is None:
        if polls % 5 == 0:
            listening |= listening_addresses(proc.pid)
        polls += 1
        try:
            for p in psutil.Process(proc.pid).children(recursive=True):
                started.setdefault(p.pid, p)
                titles.setdefault(p.pid, set()).add(name := _name(p))
                if name.startswith("ray::MapWorker") and (torch := imported_torch(p.pid)) is not None:
                    predictors[p.pid] = torch  # the evaluation's predictor actors: torch imported or not
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    for reader in readers:
        reader.join()
    stdout, stderr = ("".join(line for _, line in seen[name]) for name in ("stdout", "stderr"))
    assert proc.returncode == 0, stderr[-3000:]
    time.sleep(1)
    left = [p for p in started.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return SimpleNamespace(output=out, stdout=stdout, stderr=stderr, listening=listening, left_running=left, titles=titles,
                           tracking_uri=tracking_uri, predictors=predictors, lines=seen["stdout"],
                           metrics=json.loads((out / "metrics.json").read_text()))


def _name(process) -> str:
    try:
        return process.name()
    except Exception:  # noqa: BLE001 - gone before it was named
        return ""


@pytest.fixture(scope="session")
def shop(real_data, tmp_path_factory):
    """The catalog folder (PER_CLASS photos a class, broken files among them), a Parquet listing of the same
    files with relative paths, and new photos of the same classes to tag."""
    from tests.catalog import PER_CLASS, write_broken_into_classes, write_labelled_catalog

    root = tmp_path_factory.mktemp("shop")
    test = real_data.test
    write_labelled_catalog(root / "catalog", test.images, test.labels, PER_CLASS)
    broken = write_broken_into_classes(root / "catalog")
    rows = [(str(p.relative_to(root)), p.parent.name) for p in sorted((root / "catalog").rglob("*")) if p.is_file()]
    pd.DataFrame(rows, columns=["path", "label"]).sample(frac=1, random_state=1).to_parquet(root / "listing.parquet")
    new = write_labelled_catalog(root / "new", test.images, test.labels, 10, seed=7, skip=PER_CLASS)
    return root, broken, new


@pytest.fixture(scope="session")
def folder_run(shop, tmp_path_factory):
    """jobs/train.py on the shop's catalog folder (3 epochs): its outputs and its console. Shared by the catalog's
    tests and the review page's (its model tags the catalog, its metrics are the earlier run's)."""
    root, _, _ = shop
    out = tmp_path_factory.mktemp("runs") / "folder"
    # A progress line every 0.2 s where the output is not a terminal (as here), not every 10: the phases of
    # this small run take seconds.
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--train-data", str(root / "catalog"),
                           "--epochs", "3", "--batch-size", "32", "--output", str(out), "--storage-path",
                           str(out.parent / "storage")], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "CLF_PROGRESS_EVERY_S": "0.2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def small_catalog(real_data, tmp_path_factory) -> Path:
    """A store's catalog folder for the cluster tests: 4 classes x 40 photos (tests/catalog.py)."""
    from tests.catalog import write_labelled_catalog

    folder = tmp_path_factory.mktemp("small-catalog")
    write_labelled_catalog(folder, real_data.test.images, real_data.test.labels, per_class=40)
    return folder
