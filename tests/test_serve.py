"""Tagging online: jobs/serve.py on a real Ray Serve over loopback, asked with real HTTP requests: its answers
against jobs/tag.py's rows for the same photos, batching under concurrent requests, bad input, the token, a new
model deployed while requests stream, Ctrl-C (the served fixture's end); and the Serve config KubeRay's RayService
carries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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
from tests.helpers import ROOT
from tests.ray_cluster import LocalCluster, free_port

SERVE = str(ROOT / "jobs" / "serve.py")
TOKEN = "s3cret-token"


# --- Settings and the Serve config, no Ray ---------------------------------------------------------------------


def test_batches_can_fill_whatever_the_settings():
    # Serve hands a replica at most max_ongoing_requests at once: fewer than a batch and batches never fill.
    for batch, target in ((1, 1.0), (16, 16.0), (64, 2.0), (10, 100.0)):
        cfg = ServeConfig(checkpoint="c", max_batch_size=batch, target_ongoing_requests=target)
        assert serving.deployment_options(cfg)["max_ongoing_requests"] >= 2 * batch


def test_settings_are_flags_checked_like_the_others():
    cfg = cli.parse(ServeConfig, "test", ["--checkpoint", "runs/x", "--port", "9000", "--max-replicas", "3"])
    assert cfg == ServeConfig(checkpoint="runs/x", port=9000, max_replicas=3)
    with pytest.raises(ConfigError, match=r"min_replicas \(2\) is more than max_replicas \(1\)"):
        ServeConfig(checkpoint="c", min_replicas=2)
    proc = subprocess.run([sys.executable, SERVE, "--checkpoint", "c", "--proxy", "nginx"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'nginx'" in proc.stderr


def test_the_rayservice_runs_the_application_jobs_serve_builds():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text())}
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    # Its Serve config is one Serve itself accepts, naming our builder with settings our parser accepts.
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == serving.IMPORT_PATH and app.name == serving.APP_NAME
    cfg = ServeConfig(**app.args)
    assert cfg.checkpoint.startswith("s3://")  # replicas on any pod reach it
    assert set(serving.serve_config(cfg)["applications"][0]["args"]) == set(app.args)
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


@pytest.mark.slow
def test_a_new_model_deployed_while_requests_stream_fails_no_request(one_epoch, photos, tmp_path):
    """On a cluster (as `ray job submit` or KubeRay would run it): jobs/serve.py deploys and exits, the
    application keeps serving; run again with another checkpoint, it swaps the model in while 8 clients ask."""
    folder, _ = photos
    new = tmp_path / "untrained"
    subprocess.run([sys.executable, "-m", "tests.programs", "untrained-checkpoint", str(new)], check=True, cwd=ROOT,
                   timeout=120)
    cluster = LocalCluster(num_cpus=2).start()
    port = free_port()
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    try:
        def deploy(checkpoint: Path) -> str:
            proc = subprocess.run([sys.executable, SERVE, "--checkpoint", str(checkpoint), "--port", str(port)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            first, last = proc.stdout.strip().splitlines()[0], proc.stdout.strip().splitlines()[-1]
            assert last.startswith("deployed to the cluster at") and first.startswith("serving on http://")
            return first.split("(model ")[1].rstrip(")")

        old = deploy(one_epoch.output / "checkpoint")
        url = f"http://127.0.0.1:{port}"
        bodies = [p.read_bytes() for p in sorted(folder.glob("photo-*"))]
        answers, stop = [], threading.Event()

        def client(i: int) -> None:
            while not stop.is_set():
                answers.append((time.monotonic(), *request(f"{url}/tag", bodies[i % len(bodies)], token=None)))
                i += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        updated = deploy(new)
        done = time.monotonic()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
    finally:
        cluster.stop()
    assert updated != old
    assert [a for a in answers if a[1] != 200] == []  # no request failed
    models = [a[2]["model"] for a in answers]
    assert set(models) == {old, updated}  # each answer names one model: the old or the new
    assert all(a[2]["model"] == updated for a in answers if a[0] > done + 1)  # the new one once deployed
