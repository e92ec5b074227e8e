"""Tagging online: jobs/serve.py on a real Ray Serve over loopback (an embedded Ray), asked with real HTTP requests:
its answers against jobs/tag.py's rows for the same photos, batching under concurrent requests, bad input, the
token, Ctrl-C (the served fixture's end); and the Serve config KubeRay's RayService carries. On a cluster (the
token from the environment, bodies counted as read, a model swapped in place): tests/test_two_nodes_serving.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from clf import cli, serving
from clf.config import ServeConfig
from clf.errors import ConfigError
from tests.catalog import write_broken, write_catalog
from tests.helpers import ROOT, imported_torch
from tests.ray_cluster import free_port

SERVE = str(ROOT / "jobs" / "serve.py")
TOKEN = "s3cret-token"


# --- Settings and the Serve config, no Ray ---------------------------------------------------------------------


def test_settings_are_flags_checked_like_the_others():
    cfg = cli.parse(ServeConfig, "test", ["--checkpoint", "runs/x", "--port", "9000", "--max-replicas", "3"])
    assert cfg == ServeConfig(checkpoint="runs/x", port=9000, max_replicas=3)
    with pytest.raises(ConfigError, match=r"min_replicas \(2\) is more than max_replicas \(1\)"):
        ServeConfig(checkpoint="c", min_replicas=2)
    proc = subprocess.run([sys.executable, SERVE, "--checkpoint", "c", "--proxy", "nginx"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'nginx'" in proc.stderr


def test_the_rayservice_runs_the_application_jobs_serve_builds(monkeypatch):
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text())}
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    # A Serve config Serve itself accepts, naming our builder, with the model in the deployment's user_config (so
    # that a new one is reconfigured in: tests/test_two_nodes_serving.py deploys it) and args our builder takes.
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == serving.IMPORT_PATH and app.name == serving.APP_NAME
    (deployment,) = app.deployments
    assert deployment.name == serving.DEPLOYMENT and deployment.user_config["checkpoint"].startswith("s3://")
    assert "checkpoint" not in app.args
    # The token comes from the Secret, as CLF_SERVE_TOKEN where the builder runs; the replicas get its digest.
    monkeypatch.setenv(serving.TOKEN_ENV, "from-a-secret")
    (settings,) = serving.build(app.args)._bound_deployment.init_args
    assert settings["token_sha256"] == hashlib.sha256(b"from-a-secret").hexdigest()
    # Every pod has the Secret, and none starts without it.
    for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"], *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        token = next(e for e in container["env"] if e["name"] == serving.TOKEN_ENV)
        assert token["valueFrom"]["secretKeyRef"].get("optional", False) is False
    # The same image and Ray as the RayJob that trains.
    job = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    images = {c["image"] for spec in (service["spec"]["rayClusterConfig"], job["spec"]["rayClusterSpec"])
              for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"]


# --- The real thing -----------------------------------------------------------------------------------------------


class Server:
    """jobs/serve.py as a user starts it; `url` once it said it serves."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, SERVE, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})})
        self.first_line = self.proc.stdout.readline().strip()
        assert self.first_line.startswith("serving on http://"), self.first_line + self.proc.stdout.read()[-3000:]
        self.url = self.first_line.split()[2]

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        return self.proc.returncode, out


def request(url: str, body: bytes | None = None, token: str | None = TOKEN, content_type: str = "image/jpeg",
            method: str | None = None) -> tuple[int, object]:
    headers = {"Content-Type": content_type} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method=method),
                                    timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.jpg\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def photos(real_data, tmp_path_factory):
    """40 catalog-like photos of test images and the broken files tagging tells apart, in one folder."""
    folder = tmp_path_factory.mktemp("serve-photos")
    write_catalog(folder, real_data.test.images[:40], seed=5)
    broken = write_broken(folder)
    dark = folder / "dark.png"
    Image.new("RGB", (64, 64), (10, 10, 10)).save(dark)
    return folder, broken


@pytest.fixture(scope="module")
def served(one_epoch):
    """jobs/serve.py with the one-epoch run's model (the run's folder, as a user may give it), a token and a
    small photo limit; stopped with Ctrl-C after the module's tests, which must stop it and all it started."""
    import psutil

    server = Server("--checkpoint", str(one_epoch.output), "--port", str(free_port()), "--token", TOKEN,
                    "--max-photo-mb", "0.5")
    started = psutil.Process(server.proc.pid).children(recursive=True)
    assert {"raylet", "gcs_server"} <= {p.name() for p in started}
    try:
        yield server
    finally:
        code, out = server.stop()
        assert code == 0 and out.strip().splitlines() == ["stopped"], out[-3000:]
        time.sleep(1)
        assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_answers_are_the_rows_jobs_tag_writes_for_the_same_photos(served, one_epoch, photos, tmp_path):
    folder, broken = photos
    out = tmp_path / "tags"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "tag.py"), "--checkpoint", str(one_epoch.output / "checkpoint"),
                           "--input", str(folder), "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.read_parquet(out / "tags.parquet").set_index("path")
    model = one_epoch.metrics["config"]["run_name"]
    for path, row in rows.iterrows():
        status, answer = request(f"{served.url}/tag", Path(path).read_bytes())
        if row["error"]:
            assert status in (400, 413, 415, 422) and answer == {"error": row["error"]}, (path, answer)
            continue
        assert status == 200 and answer["model"].startswith(f"{model}@"), answer
        assert answer["tag"] == row["tag"] and answer["class_id"] == row["class_id"], (path, answer)
        for k in (1, 2, 3):
            assert answer[f"top{k}"] == row[f"top{k}"]
            assert answer[f"top{k}_prob"] == pytest.approx(row[f"top{k}_prob"], abs=1e-5)
        assert answer["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
        assert answer["needs_review"] == row["needs_review"] and answer["error"] == ""
    # Several photos in one request: a row each, in the order sent, bad ones with their reason.
    names = sorted(rows.index)[:12]
    body, content_type = multipart([(f"f{i}", Path(p).read_bytes()) for i, p in enumerate(names)])
    status, answers = request(f"{served.url}/tag", body, content_type=content_type)
    assert status == 200 and len(answers) == len(names)
    for path, answer in zip(names, answers):
        tag = rows.loc[path, "tag"]
        assert answer["error"] == rows.loc[path, "error"] and answer["tag"] == (None if pd.isna(tag) else tag)
    assert {Path(p).name for p in rows.index[rows["error"] != ""]} == set(broken) | {"dark.png"}


@pytest.mark.slow
def test_the_replica_predicts_without_torch(served, photos):
    import psutil

    folder, _ = photos
    assert request(f"{served.url}/tag", next(folder.glob("photo-*")).read_bytes())[0] == 200
    replicas = [p for p in psutil.Process(served.proc.pid).children(recursive=True)
                if p.name().startswith("ray::ServeReplica")]
    assert replicas and [imported_torch(p.pid) for p in replicas] == [False] * len(replicas)


@pytest.mark.slow
def test_photos_that_arrive_together_share_forward_passes(served, photos):
    folder, _ = photos
    bodies = [p.read_bytes() for p in sorted(folder.glob("photo-*"))]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda b: request(f"{served.url}/tag", b), bodies * 3))
    assert all(status == 200 for status, _ in answers)
    _, stats = request(f"{served.url}/stats", method="GET")
    assert max(stats["batch_sizes"]) > 1, stats["batch_sizes"]


@pytest.mark.slow
def test_bad_input_is_a_4xx_with_a_reason_and_the_server_keeps_serving(served, photos):
    folder, _ = photos
    good = next(folder.glob("photo-00000.*"))
    large = Image.effect_noise((800, 800), 90).convert("RGB")
    large_path = folder.parent / "large.png"
    large.save(large_path)  # about 1 MB of noise: over --max-photo-mb 0.5
    cases = [
        (b"", 400, "empty file"),
        (b"just some text\n", 415, "not an image"),
        (large_path.read_bytes(), 413, "image too large"),
        ((folder / "truncated.jpg").read_bytes(), 422, "truncated"),
        ((folder / "dark.png").read_bytes(), 422, "dark background"),
    ]
    for body, code, reason in cases:
        status, answer = request(f"{served.url}/tag", body)
        assert status == code and set(answer) == {"error"} and answer["error"].startswith(reason), (reason, answer)
        assert "\n" not in answer["error"]
        assert request(f"{served.url}/tag", good.read_bytes())[0] == 200  # still serving
    status, answer = request(f"{served.url}/tag", b"x", content_type="multipart/form-data; boundary=nothing")
    assert status == 400 and answer["error"].startswith("not a readable multipart form")
    body, content_type = multipart([])
    status, answer = request(f"{served.url}/tag", body, content_type=content_type)
    assert status == 400 and answer["error"] == "a multipart request with no file in it"


@pytest.mark.slow
def test_a_token_is_asked_for_except_by_the_health_check(served, photos):
    folder, _ = photos
    photo = next(folder.glob("photo-*")).read_bytes()
    assert request(f"{served.url}/tag", photo, token=None)[0] == 401
    assert request(f"{served.url}/tag", photo, token="wrong")[0] == 401
    assert request(f"{served.url}/classes", token=None)[0] == 401
    status, health = request(f"{served.url}/healthz", token=None)
    assert status == 200 and health["status"] == "ok"
    status, classes = request(f"{served.url}/classes")
    assert status == 200 and len(classes["classes"]) == 10
