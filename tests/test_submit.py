"""`ray job submit` against a real local cluster on loopback, with token authentication."""

import json
import sys

import pandas as pd
import pytest

from tests.catalog import write_broken, write_catalog
from tests.console_lines import EPOCH, check_only_ours
from tests.helpers import ROOT
from tests.ray_cluster import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(num_cpus=2).start()
    try:
        yield c
    finally:
        c.stop()
    assert c.processes() == []


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("submit") / "submitted"
    proc = cluster.submit("python", "jobs/train.py", "--epochs", "1", "--output", str(out), working_dir=ROOT)
    return out, proc.returncode, proc.stdout + proc.stderr, proc.stdout


def job_part(stdout: str) -> str:
    """What the job printed, without the lines `ray job submit` and Ray's job manager print around it (the
    last of them before it: "Running entrypoint for job ...")."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint for job ")) + 1
    end = next(i for i in range(len(lines) - 1, start, -1) if "-----" in lines[i] and "-----" in lines[i - 2])
    return "\n".join(lines[start:end - 2])


def test_job_submit_trains_and_writes_outputs_where_asked(cluster, submitted):
    out, returncode, log, stdout = submitted
    assert returncode == 0, log[-3000:]
    assert "succeeded" in log
    # The job's part of the log (between what `ray job submit` prints before and after it): our lines only,
    # the same as on a console.
    lines = check_only_ours(job_part(stdout), at_most=9)  # 6, and a progress line every 10 s
    assert any(EPOCH.fullmatch(line) for line in lines)
    assert "accuracy 0." in log and f"outputs in {out}: report.html" in log

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.85
    assert metrics["config"]["epochs"] == 1
    assert len(pd.read_parquet(out / "predictions.parquet")) == 10_000
    assert (out / "checkpoint" / "model.pt").is_file()

    # The uploaded working dir is the code, not the virtual environment, runs or data.
    uploads = [p for p in (cluster.session_dir() / "runtime_resources" / "working_dir_files").iterdir() if p.is_dir()]
    assert uploads
    for upload in uploads:
        names = {p.name for p in upload.iterdir()}
        assert {"clf", "jobs"} <= names
        assert not names & {".venv", "runs", "data", ".git"}


def test_job_submit_tags_photos_with_the_submitted_model(cluster, submitted, real_data, tmp_path):
    out, returncode, _, _ = submitted
    assert returncode == 0
    write_catalog(tmp_path / "photos", real_data.test.images[:40])
    write_broken(tmp_path / "photos")
    tags = tmp_path / "tags"
    proc = cluster.submit(
        "python", "jobs/tag.py", "--checkpoint", str(out / "checkpoint"), "--input", str(tmp_path / "photos"),
        "--output", str(tags), working_dir=ROOT,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "tagged 40 of 43 files" in log and "failed: 3" in log
    rows = pd.read_parquet(tags / "tags.parquet")
    assert len(rows) == 43 and (rows["error"] != "").sum() == 3


def test_job_submit_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", cluster.dashboard_url],
        env={**env, "HOME": str(ROOT / "tests")},  # no ~/.ray/auth_token to fall back on
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "Authentication" in proc.stdout + proc.stderr


def test_job_submit_trains_on_a_stores_catalog(cluster, small_catalog, tmp_path):
    out = tmp_path / "catalog-run"
    proc = cluster.submit("python", "jobs/train.py", "--train-data", str(small_catalog), "--epochs", "2",
                          "--batch-size", "32", "--output", str(out), working_dir=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["bags", "dresses", "sneakers", "trousers"]
    assert metrics["count"] == 16 and metrics["skipped_files"] == []  # 4 of each class's 40 held out
