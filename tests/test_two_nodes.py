"""A real two-node cluster on loopback whose nodes share no disk, as a real cluster's hosts do: a head from
`ray start` and a second node in a mount namespace of its own, with empty private folders over the tests'
folder and ~/ray_results (2 CPUs each, token authentication on), and an S3-compatible server on loopback
that both reach. Jobs keep their checkpoints, catalogs, photos and outputs in the bucket, size themselves
per node, run a worker on each node, survive a worker killed on the second node and a driver killed and
started again; local paths that the second node cannot see are refused in one line before any work. Jobs
reach it through `ray job submit` (token authentication), or as drivers with RAY_ADDRESS set."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.catalog import write_broken, write_catalog
from tests.faults import finish, kill_driver, start_driver, wait_for_checkpoint, worker_killed_after_first_checkpoint
from tests.console_lines import EPOCH, check_only_ours
from tests.helpers import ROOT, real_dataset_dir

pytestmark = pytest.mark.slow

TRAIN = str(ROOT / "jobs" / "train.py")


@pytest.fixture(scope="module")
def bucket(s3):
    return s3.bucket("two-nodes")


@pytest.fixture(scope="module")
def data_dir(real_data, tmp_path_factory):
    return real_dataset_dir(real_data, tmp_path_factory.mktemp("data"), n_train=6000, n_test=1000)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    """A checkpoint folder on the driver's disk (where the rows count, not the tags)."""
    folder = tmp_path_factory.mktemp("untrained") / "checkpoint"
    subprocess.run([sys.executable, "-m", "tests.programs", "untrained-checkpoint", str(folder)], check=True,
                   cwd=ROOT, timeout=120)
    return folder


def node_ids(cluster) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(); print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"],
        env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def submitted(cluster, *entrypoint: str) -> str:
    proc = cluster.submit("python", *entrypoint, working_dir=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


def training_workers_on_the_second_node(cluster):
    return lambda: [p for p in cluster.processes(cluster.worker_temp_dirs) if p.name().startswith("ray::RayTrainWorker")]


@pytest.fixture(scope="module")
def submitted_run(cluster, bucket, data_dir):
    """`ray job submit` of a training run, a worker on each node, checkpoints and outputs in the bucket; the
    worker on the second node SIGKILLed once a checkpoint is registered. Returns its outputs' URI and the log."""
    with worker_killed_after_first_checkpoint(f"{bucket}/checkpoints/killed",
                                              training_workers_on_the_second_node(cluster)) as killed:
        proc = cluster.submit("python", "jobs/train.py", "--epochs", "3", "--data-dir", str(data_dir), "--run-name",
                              "killed", "--storage-path", f"{bucket}/checkpoints", "--output", f"{bucket}/outputs/killed",
                              working_dir=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert killed, "no training worker was found on the second node"
    return f"{bucket}/outputs/killed", proc.stdout


def job_part(stdout: str) -> str:
    """What the job printed, without the lines `ray job submit` and Ray's job manager print around it (the
    last of them before it: "Running entrypoint for job ...")."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint for job ")) + 1
    end = next(i for i in range(len(lines) - 1, start, -1) if "-----" in lines[i] and "-----" in lines[i - 2])
    return "\n".join(lines[start:end - 2])


def test_a_submitted_job_prints_our_lines_only_and_uploads_the_code_alone(cluster, submitted_run):
    _, log = submitted_run
    lines = check_only_ours(job_part(log), at_most=14)  # its lines, and a progress line every 10 s
    assert any(EPOCH.fullmatch(line) for line in lines) and "succeeded" in log
    # The uploaded working dir is the code, not the virtual environment, runs or data.
    uploads = [p for p in (cluster.session_dir() / "runtime_resources" / "working_dir_files").iterdir() if p.is_dir()]
    assert uploads
    for upload in uploads:
        names = {p.name for p in upload.iterdir()}
        assert {"clf", "jobs"} <= names and not names & {".venv", "runs", "data", ".git"}


def test_without_the_token_a_cluster_refuses_jobs(cluster):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", cluster.dashboard_url],
        env={**env, "HOME": str(ROOT / "tests")},  # no ~/.ray/auth_token to fall back on
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "Authentication" in proc.stdout + proc.stderr


def test_checkpoints_and_outputs_in_a_bucket_and_a_worker_killed_on_the_other_node(cluster, s3, submitted_run):
    outputs, log = submitted_run
    metrics = json.loads(s3.read(f"{outputs}/metrics.json"))
    # Without sizing flags, one worker per node sized to it; one of them was killed and the run resumed.
    assert metrics["plan"]["training"] == {
        "num_workers": 2, "min_workers": 2, "cpus_per_worker": 2, "use_gpu": False, "placement": "SPREAD",
        "waits_for_nodes": False, "sized_to_free": False,
    }
    assert set(metrics["placement"]["training_workers"]) == node_ids(cluster)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3] and metrics["history"][-1]["resumed_from_epoch"] >= 1
    assert "training resumed from the checkpoint after epoch" in log
    # Every output in the bucket, written by the driver; the checkpoints too.
    assert s3.keys(outputs) == sorted([
        "checkpoint/model.json", "checkpoint/model.onnx", "checkpoint/model.pt", "checkpoint/train_state.pt",
        "confusion_matrix.png",
        "history.png", "metrics.json", "mistakes.png", "per_class.png", "predictions.parquet", "report.html",
    ])
    assert any(k.startswith("checkpoint_") for k in s3.keys(outputs.replace("/outputs/", "/checkpoints/")))
    # Evaluated (the model reaches the actors through the object store, wherever they are), complete and correct.
    rows = pd.read_parquet(io.BytesIO(s3.read(f"{outputs}/predictions.parquet")))
    assert sorted(rows["id"]) == list(range(1000)) and metrics["count"] == 1000
    assert metrics["accuracy"] == pytest.approx(np.mean(rows["label"] == rows["prediction"]), abs=1e-6)
    actors = metrics["placement"]["inference_actors"]
    assert sum(a["rows"] for a in actors) == 1000 and {a["node"] for a in actors} <= node_ids(cluster)


def test_a_folder_every_node_sees_passes_the_check_that_a_private_one_fails(cluster, tmp_path):
    # A folder outside the second node's private ones (on a real cluster, an NFS mount) is seen by both nodes;
    # one in the tests' folder is this machine's alone. The check a run makes of --storage-path and local data.
    shared = Path(tempfile.mkdtemp(prefix="clf-shared-", dir="/tmp"))
    try:
        def check(path):
            proc = subprocess.run([sys.executable, "-m", "tests.programs", "refuse-unseen", str(path)], cwd=ROOT,
                                  env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            return proc.stdout.strip().splitlines()[-1]

        assert check(shared) == "seen everywhere"
        assert check(tmp_path).startswith("refused: the paths is on this machine's disk only: 1 of the 2 nodes")
    finally:
        shutil.rmtree(shared)


def local_storage(tmp_path, data_dir, small_catalog, untrained, bucket):
    """The default --storage-path, ~/ray_results: a folder of the driver's machine."""
    return (["jobs/train.py", "--data-dir", str(data_dir), "--output", str(tmp_path / "out")],
            f"--storage-path {Path.home() / 'ray_results'} is on this machine's disk only: 1 of the 2 nodes")


def search_with_local_storage(tmp_path, data_dir, small_catalog, untrained, bucket):
    """A search checks what training checks, before any trial."""
    return (["jobs/tune.py", "--data-dir", str(data_dir), "--output", str(tmp_path / "out"), "--trials", "2"],
            f"--storage-path {Path.home() / 'ray_results'} is on this machine's disk only: 1 of the 2 nodes")


def search_on_a_local_catalog(tmp_path, data_dir, small_catalog, untrained, bucket):
    return (["jobs/tune.py", "--train-data", str(small_catalog), "--storage-path", f"{bucket}/checkpoints",
             "--output", str(tmp_path / "out")],
            f"--train-data {small_catalog} (its photos) is on this machine's disk only: 1 of the 2 nodes")


def local_catalog(tmp_path, data_dir, small_catalog, untrained, bucket):
    return (["jobs/train.py", "--train-data", str(small_catalog), "--storage-path", f"{bucket}/checkpoints",
             "--output", str(tmp_path / "out")],
            f"--train-data {small_catalog} (its photos) is on this machine's disk only: 1 of the 2 nodes")


def local_photos(tmp_path, data_dir, small_catalog, untrained, bucket):
    return (["jobs/tag.py", "--checkpoint", str(untrained), "--input", str(small_catalog), "--output",
             str(tmp_path / "out")],
            f"--input {small_catalog} (its photos) is on this machine's disk only: 1 of the 2 nodes")


@pytest.mark.parametrize("case", [local_storage, local_catalog, local_photos, search_with_local_storage,
                                  search_on_a_local_catalog])
def test_local_paths_the_other_node_cannot_see_are_refused_before_any_work(cluster, data_dir, small_catalog, untrained,
                                                                           bucket, tmp_path, case):
    entrypoint, complaint = case(tmp_path, data_dir, small_catalog, untrained, bucket)
    proc = subprocess.run([sys.executable, *entrypoint], cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address},
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log[-3000:]
    errors = [line for line in log.splitlines() if ".py: error:" in line]
    assert len(errors) == 1 and complaint in errors[0], log[-3000:]
    assert "Traceback" not in log and "epoch 1/" not in log and "tagging " not in log and "trial 1/" not in log
    assert not (tmp_path / "out").exists()


def test_tagging_photos_in_a_bucket_with_the_submitted_runs_model_in_the_bucket(cluster, s3, bucket, submitted_run,
                                                                               real_data, tmp_path):
    outputs, _ = submitted_run
    write_catalog(tmp_path / "photos", real_data.test.images[:120])
    write_broken(tmp_path / "photos" / "broken")
    photos = s3.upload(tmp_path / "photos", f"{bucket}/photos")
    log = submitted(cluster, "jobs/tag.py", "--checkpoint", f"{outputs}/checkpoint", "--input", f"{photos}/",
                    "--output", f"{bucket}/tags", "--batch-size", "16")
    assert [k for k in s3.keys(f"{bucket}/tags") if not k.startswith("review/")] == [
        "review.html", "summary.json", "tags.parquet"]
    rows = pd.read_parquet(io.BytesIO(s3.read(f"{bucket}/tags/tags.parquet")))
    assert sorted(rows["path"]) == [f"{photos}/{key}" for key in s3.keys(photos)]  # every file, once
    assert (rows["error"] != "").sum() == 3 and rows["error"].str.contains("file not found").sum() == 0
    summary = json.loads(s3.read(f"{bucket}/tags/summary.json"))
    assert summary["files"] == 123 and summary["tagged"] == 120 and summary["failed"] == 3
    assert len(summary["nodes"]) == 2 and "predictor actors ran on 2 node(s)" in log
    assert f"tags in {bucket}/tags/tags.parquet" in log
    # The trained model's tags: most of the photos of test images get the test set's label.
    tagged = rows[rows["error"] == ""]
    truth = real_data.test.labels[tagged["path"].str.extract(r"photo-(\d+)\.")[0].astype(int)]
    assert (tagged["class_id"].to_numpy() == truth).mean() >= 0.6  # an untrained model: about 0.1


def test_tagging_a_listing_of_uris_with_a_checkpoint_on_the_drivers_disk(cluster, s3, bucket, untrained, real_data,
                                                                       tmp_path):
    write_catalog(tmp_path / "photos", real_data.test.images[:60])
    photos = s3.upload(tmp_path / "photos", f"{bucket}/listed")
    entries = [f"{photos}/{key}" for key in s3.keys(photos)] + [f"{photos}/gone.jpg"]
    pd.DataFrame({"path": entries}).to_csv(tmp_path / "listing.csv", index=False)
    listing = s3.upload(tmp_path / "listing.csv", f"{bucket}/lists/listing.csv")
    out = tmp_path / "tags"
    log = submitted(cluster, "jobs/tag.py", "--checkpoint", str(untrained), "--input", listing, "--output", str(out),
                    "--format", "csv", "--batch-size", "8")
    assert sorted(p.name for p in out.iterdir()) == ["review", "review.html", "summary.json", "tags.csv"]  # the driver's
    rows = pd.read_csv(out / "tags.csv", keep_default_na=False)
    assert sorted(rows["path"]) == sorted(entries)
    assert rows.loc[rows["path"].str.endswith("gone.jpg"), "error"].tolist() == ["file not found"]
    assert (rows["error"] == "").sum() == 60
    assert "predictor actors ran on 2 node(s)" in log  # the model reached the second node without its disk


def test_a_catalog_in_a_bucket_resumes_by_name_after_the_driver_is_killed_and_refuses_changed_photos(cluster, s3, bucket, small_catalog, tmp_path):
    """Tracked to MLflow all along: the killed run's MLflow run deleted meanwhile, the resumed run tracks a new one
    (one warning); a refusal after the MLflow run started (a photo that reads otherwise now) ends it FAILED."""
    from mlflow import MlflowClient

    catalog = s3.upload(small_catalog, f"{bucket}/catalog")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--train-data", f"{catalog}/", "--epochs", "2", "--batch-size", "16", "--storage-path",
              f"{bucket}/checkpoints", "--run-name", "shop", "--tracking-uri", uri]
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    first_log = tmp_path / "first.log"
    first = start_driver([*common, "--output", str(tmp_path / "first")], first_log, env=env)
    wait_for_checkpoint(f"{bucket}/checkpoints/shop", first, first_log)
    kill_driver(first)
    assert not (tmp_path / "first").exists()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("clf").experiment_id
    [killed] = client.search_runs([experiment])
    client.delete_run(killed.info.run_id)  # its checkpoints still name it

    second_log = tmp_path / "second.log"
    second = start_driver([*common, "--output", str(tmp_path / "second")], second_log, env=env)
    out = finish(second, second_log)
    assert second.returncode == 0, out[-3000:]
    assert "run shop has a checkpoint after epoch" in out
    warnings = [line for line in out.splitlines() if "warning" in line]
    assert len(warnings) == 1, out[-3000:]
    assert warnings[0].startswith(f"train.py: warning: MLflow run {killed.info.run_id} cannot be continued (")
    assert warnings[0].endswith("this run is tracked as a new MLflow run")
    [tracked] = client.search_runs([experiment])
    assert tracked.info.run_id != killed.info.run_id and tracked.info.status == "FINISHED"
    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert tracked.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert metrics["history"][-1]["resumed_from_epoch"] >= 1 and [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert set(metrics["placement"]["training_workers"]) == node_ids(cluster)  # a shard on each node
    assert metrics["classes"] == ["bags", "dresses", "sneakers", "trousers"]
    assert metrics["count"] == 16 and metrics["skipped_files"] == []
    assert all(p.startswith(f"{catalog}/") for p in pd.read_parquet(tmp_path / "second" / "predictions.parquet")["path"])

    # A photo overwritten with as many bytes of nothing: the listing is the same (its sizes too), the photos read
    # are not. Refused once read, after its MLflow run went on: ended FAILED.
    fs = s3.filesystem()
    keys = s3.keys(catalog)
    first_photo = f"{catalog.removeprefix('s3://')}/{keys[0]}"
    size = fs.get_file_info(first_photo).size
    with fs.open_output_stream(first_photo) as f:
        f.write(b"\0" * size)
    third = subprocess.run([sys.executable, TRAIN, *common, "--output", str(tmp_path / "third")], env=env,
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert third.returncode == 2, third.stderr[-3000:]
    assert "was trained on other photos than the ones read now" in third.stderr and "Traceback" not in third.stderr
    assert client.get_run(tracked.info.run_id).info.status == "FAILED"

    # Every photo emptied: the bucket's listing gives other sizes, and the run is refused on them before any
    # photo is read (read first, the same run would fail on "... of the ... photos cannot be read").
    for key in keys:
        with fs.open_output_stream(f"{catalog.removeprefix('s3://')}/{key}") as f:
            f.write(b"")
    fourth = subprocess.run([sys.executable, TRAIN, *common, "--output", str(tmp_path / "fourth")], env=env,
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert fourth.returncode == 2, fourth.stderr[-3000:]
    assert "run 'shop'" in fourth.stderr and "was started on other data" in fourth.stderr
    assert "cannot be read" not in fourth.stderr and "skipped" not in fourth.stdout
    assert "Traceback" not in fourth.stderr and not (tmp_path / "fourth").exists()
