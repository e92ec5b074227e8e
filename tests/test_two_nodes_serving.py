"""The endpoint on the two-node rig (tests/conftest.py's `cluster`: token authentication, no shared disk, the models
in the S3 bucket), deployed as a store deploys it: `jobs/serve.py` with RAY_ADDRESS set, and KubeRay's RayService
config through `serve deploy`. The token travels from the deploying job's environment; a body is counted as it
is read; a new model reaches the running replicas in place; a GPU nobody has is refused at once; and a training
run beside the endpoint sizes itself to what the endpoint leaves free."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.catalog import write_catalog
from tests.helpers import ROOT, real_dataset_dir
from tests.ray_cluster import free_port
from tests.test_serve import SERVE, request

pytestmark = pytest.mark.slow

TOKEN = "from-the-environment"
REPLICA = "ray::ServeReplica:clf:Tagger"


@pytest.fixture(scope="module")
def models(s3, one_epoch, tmp_path_factory) -> SimpleNamespace:
    """The one-epoch run's checkpoint and an untrained one, in the bucket every node reaches."""
    bucket = s3.bucket("serving")
    untrained = tmp_path_factory.mktemp("untrained") / "checkpoint"
    subprocess.run([sys.executable, "-m", "tests.programs", "untrained-checkpoint", str(untrained)], check=True,
                   cwd=ROOT, timeout=120)
    return SimpleNamespace(trained=s3.upload(one_epoch.output / "checkpoint", f"{bucket}/trained/checkpoint"),
                           untrained=s3.upload(untrained, f"{bucket}/untrained/checkpoint"))


@pytest.fixture(scope="module")
def photos(real_data, tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("rig-photos")
    return [p.read_bytes() for p in write_catalog(folder, real_data.test.images[:16], seed=3)]


@pytest.fixture(scope="module")
def endpoint(cluster):
    """`deploy(...)`: jobs/serve.py against the rig on one port for the module; the application removed after (its
    replica's CPU given back to the tests that follow)."""
    port = free_port()
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}

    def deploy(*args: str, token_env: str | None = TOKEN) -> subprocess.CompletedProcess:
        extra = {"CLF_SERVE_TOKEN": token_env} if token_env else {}
        started = time.monotonic()
        proc = subprocess.run([sys.executable, SERVE, "--port", str(port), "--max-photo-mb", "1", *args], cwd=ROOT,
                              env={**env, **extra}, capture_output=True, text=True, timeout=600)
        proc.seconds = time.monotonic() - started
        return proc

    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, deploy=deploy, env=env)
    subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); serve.delete('clf', _blocking=False)"],
                   env=env, cwd=ROOT, timeout=120, check=True)


def replica(cluster, url: str) -> tuple[str, set[int]]:
    """Serve's id of the replica that answers, and the pids of the cluster's replica processes."""
    _, health = request(f"{url}/healthz", token=None)
    return health["replica"], {p.pid for p in cluster.processes() if p.name().startswith(REPLICA)}


def test_a_token_given_only_in_the_deploying_jobs_environment_is_asked_for(endpoint, models, photos):
    proc = endpoint.deploy("--checkpoint", models.trained)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith(f"serving on {endpoint.url} (model ") and "no token" not in proc.stdout
    assert request(f"{endpoint.url}/classes", token=None)[0] == 401
    assert request(f"{endpoint.url}/tag", photos[0], token="wrong")[0] == 401
    assert request(f"{endpoint.url}/classes", token=TOKEN)[0] == 200
    assert request(f"{endpoint.url}/healthz", token=None)[0] == 200


def chunked(port: int, chunks, content_type: str) -> tuple[int, dict]:
    """A POST /tag whose body is sent in chunks, with no Content-Length."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/tag", body=chunks, encode_chunked=True,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type})
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read())


def test_a_chunked_body_over_the_limit_is_413_and_the_next_request_is_answered(endpoint, photos):
    megabyte = b"\xff" * 2**20
    status, refused = chunked(endpoint.port, (megabyte for _ in range(20)), "image/jpeg")
    assert status == 413 and refused["error"].startswith("image too large (over 1 MB)"), refused
    # A multipart body too, counted as it is read (its limit: 16 photos' worth), whatever its parts hold.
    part = b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"f.jpg\"\r\n\r\n"
    status, refused = chunked(endpoint.port, (part if i == 0 else megabyte for i in range(20)),
                              "multipart/form-data; boundary=b")
    assert status == 413 and refused["error"].startswith("request too large (over 16 MB)"), refused
    status, answer = request(f"{endpoint.url}/tag", photos[0], token=TOKEN)
    assert status == 200 and answer["tag"], answer


def test_a_new_model_reaches_the_same_replicas_while_requests_stream(cluster, endpoint, models, photos):
    before = replica(cluster, endpoint.url)
    old = request(f"{endpoint.url}/healthz", token=None)[1]["model"]
    answers, stop = [], threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            answers.append((time.monotonic(), *request(f"{endpoint.url}/tag", photos[i % len(photos)], token=TOKEN)))
            i += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    proc = endpoint.deploy("--checkpoint", models.untrained)
    done = time.monotonic()
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    new = proc.stdout.split("(model ")[1].split(")")[0]
    assert new != old and new.startswith("untrained@")
    assert replica(cluster, endpoint.url) == before  # the same replica, the same process: reconfigured, not replaced
    assert [a for a in answers if a[1] != 200] == []  # no request failed
    assert {a[2]["model"] for a in answers} == {old, new}  # each answer names one model, the old or the new
    assert all(a[2]["model"] == new for a in answers if a[0] > done + 1)  # the new one once deployed


def test_a_gpu_the_cluster_lacks_is_refused_in_one_line_and_the_endpoint_serves_on(endpoint, models):
    proc = endpoint.deploy("--checkpoint", models.trained, "--use-gpu")
    assert proc.returncode == 2 and proc.seconds < 60, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "serve.py: error: --use-gpu was given but the Ray cluster has no GPU (and no autoscaler that can add one)"]
    assert request(f"{endpoint.url}/healthz", token=None)[1]["model"].startswith("untrained@")


def test_the_rayservice_config_deploys_and_swaps_its_model_in_place(cluster, endpoint, models, one_epoch, tmp_path):
    """k8s/rayservice.yaml's serveConfigV2 as written, on this rig's port, through `serve deploy` (the dashboard's
    REST API, as KubeRay applies it): a changed checkpoint in its user_config keeps the replicas."""
    service = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text())
                   if d["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["http_options"] = {"host": "127.0.0.1", "port": endpoint.port}
    user_config = config["applications"][0]["deployments"][0]["user_config"]

    def serve_deploy(checkpoint: str, run: str) -> str:
        user_config["checkpoint"] = checkpoint
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
        subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", str(tmp_path / "serve.yaml"), "-a",
                        cluster.dashboard_url], env=cluster.env, check=True, capture_output=True, timeout=300)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status, health = request(f"{endpoint.url}/healthz", token=None)
            if status == 200 and health["model"].startswith(f"{run}@"):
                return health["model"]
            time.sleep(0.5)
        pytest.fail(f"the RayService config did not come to serve {checkpoint}")

    serve_deploy(models.trained, one_epoch.metrics["config"]["run_name"])
    before = replica(cluster, endpoint.url)
    serve_deploy(models.untrained, "untrained")
    assert replica(cluster, endpoint.url) == before
    # No Secret on these nodes: the builder found no CLF_SERVE_TOKEN, and asks for none.
    assert request(f"{endpoint.url}/classes", token=None)[0] == 200


def test_training_beside_the_endpoint_is_sized_to_what_it_leaves_free(cluster, endpoint, models, s3, real_data,
                                                                      tmp_path):
    proc = endpoint.deploy("--checkpoint", models.trained, token_env=None)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"no token: anyone who reaches {endpoint.url} can use it" in proc.stdout  # said, in one line
    data_dir = real_dataset_dir(real_data, tmp_path / "data", n_train=1500, n_test=300)
    bucket = s3.bucket("beside")
    train = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data-dir", str(data_dir), "--epochs",
                            "1", "--storage-path", f"{bucket}/checkpoints", "--output", f"{bucket}/out"], cwd=ROOT,
                           env=endpoint.env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "sized to what is free: the cluster has 2 node(s): 2 CPU, 2 CPU, free now: " in train.stdout
    metrics = json.loads(s3.read(f"{bucket}/out/metrics.json"))
    workers = metrics["plan"]["training"]
    assert workers["sized_to_free"] and workers["num_workers"] * workers["cpus_per_worker"] <= 3
    assert metrics["count"] == 300
    assert request(f"{endpoint.url}/healthz", token=None)[0] == 200  # served on all the while
