"""Shared fixtures: a Ray of our own on loopback, the real data, and one real training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# Ray >= 2.59 turns token auth on for new local clusters unless told; the in-process clusters of these
# tests are loopback-only and say so explicitly. (The job-submission tests use token auth.)
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from clf import data, runtime  # noqa: E402
from tests.helpers import ROOT, listening_addresses  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray for one test module, on loopback, stopped after it (only this process's own Ray)."""
    import ray

    runtime.loopback_mode()
    ray.init(**runtime.LOCAL_RAY, num_cpus=2)
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
def real_data() -> data.FashionMNIST:
    try:
        return data.load()
    except data.DataError as e:
        pytest.fail(f"the real Fashion-MNIST is needed for this test: {e}")


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """`run()` for one epoch on the real data in a fresh process, as a user's script would call it, with
    its embedded Ray; meanwhile, every TCP port that the process and its descendants listen on is
    recorded. Shared by the job's tests and the tagging tests (which tag with its checkpoint)."""
    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    env = {k: v for k, v in os.environ.items() if k not in runtime.LOOPBACK_ENV}  # the job must see to it itself
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.programs", "run-one-epoch", str(out), str(out.parent / "ray")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    listening = set()
    while proc.poll() is None:
        listening |= listening_addresses(proc.pid)
        time.sleep(1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["output"] = Path(result["output"])
    return SimpleNamespace(**result, listening=listening, log=stdout + stderr)


@pytest.fixture(scope="session")
def small_catalog(real_data, tmp_path_factory) -> Path:
    """A store's catalog folder for the cluster tests: 4 classes x 40 photos (tests/catalog.py)."""
    from tests.catalog import write_labelled_catalog

    folder = tmp_path_factory.mktemp("small-catalog")
    write_labelled_catalog(folder, real_data.test.images, real_data.test.labels, per_class=40)
    return folder
