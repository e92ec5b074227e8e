"""Real recoveries through the real CLI: Ctrl-C mid-run and the run started again with the same name; a worker
node lost mid-training on a two-node loopback cluster whose nodes share no disk (checkpoints in the loopback
S3 server). A driver killed outright is tried on the two-node cluster (tests/test_two_nodes.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from clf import storage
from tests.faults import finish, start_driver, wait_for_checkpoint, wait_for_process
from tests.helpers import ROOT, real_dataset_dir
from tests.ray_cluster import LocalCluster, not_shared

pytestmark = pytest.mark.slow

TRAIN = str(ROOT / "jobs" / "train.py")
EPOCHS = 5  # of the runs that lose a node


@pytest.fixture(scope="module")
def data_dir(real_data, tmp_path_factory):
    return real_dataset_dir(real_data, tmp_path_factory.mktemp("data"), n_train=3000, n_test=500)


def test_ctrl_c_keeps_the_checkpoint_the_run_resumes_from_and_a_finished_run_is_evaluated_again(data_dir, tmp_path):
    """Ctrl-C in training (exit 130, what is kept, how to resume), the run started again (it resumes, and ends
    as the same run never interrupted does), Ctrl-C in its evaluation (exit 130, no outputs), and the run
    started once more (it had finished: its final model is evaluated)."""
    storage = tmp_path / "storage"
    common = ["--data-dir", str(data_dir), "--epochs", "3", "--batch-size", "64", "--storage-path", str(storage)]
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    named = [*common, "--run-name", "nightly", "--tracking-uri", tracking_uri]

    log = tmp_path / "first.log"
    first = start_driver([*named, "--output", str(tmp_path / "first")], log)
    wait_for_checkpoint(storage / "nightly", first, log)
    first.send_signal(signal.SIGINT)
    out = finish(first, log, timeout=60)
    assert first.returncode == 130, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(rf"train\.py: interrupted: run nightly keeps its checkpoint after epoch [123] in "
                        rf"{re.escape(str(storage))}/nightly; start it again with --run-name nightly \(and the same "
                        r"settings\) to resume it", last), last
    assert "Traceback" not in out and not (tmp_path / "first").exists()

    log = tmp_path / "second.log"
    second = start_driver([*named, "--output", str(tmp_path / "second")], log)
    evaluation = wait_for_process(second, "ray::MapWorker", log)  # the predictor actors: evaluation is under way
    second.send_signal(signal.SIGINT)
    out = finish(second, log, timeout=60)
    assert second.returncode == 130, out[-3000:]
    assert "run nightly has a checkpoint after epoch" in out and "training resumed from the checkpoint" in out
    assert out.strip().splitlines()[-1] == "train.py: interrupted; no outputs were written", evaluation
    assert not (tmp_path / "second").exists()

    log = tmp_path / "third.log"
    third = start_driver([*named, "--output", str(tmp_path / "third")], log)
    out = finish(third, log)
    assert third.returncode == 0, out[-3000:]
    assert "run nightly had finished its 3 epoch(s): evaluating its final model" in out
    assert "training resumed" not in out  # it trained nothing this time
    # Every start tracked to the end (a changed --output does not stop it: MLflow's params cannot change).
    assert not [log for log in ("first", "second", "third") if "warning" in (tmp_path / f"{log}.log").read_text()]
    resumed = json.loads((tmp_path / "third" / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]  # the epochs before Ctrl-C too
    assert resumed["history"][-1]["resumed_from_epoch"] >= 1  # went on; did not start over

    # Never interrupted: the same numbers, so the resumed run lost and repeated nothing.
    clean = subprocess.run([sys.executable, TRAIN, *common, "--output", str(tmp_path / "clean")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    uninterrupted = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"]]
    assert resumed["accuracy"] == uninterrupted["accuracy"] and resumed["count"] == 500

    # One MLflow run for the run, through its three starts: continued, not started again; every epoch logged
    # once, at its own step, with the values metrics.json has; ended FINISHED.
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("clf").experiment_id])
    assert run.info.run_name == "nightly" and run.info.status == "FINISHED"
    logged = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in logged] == [(h["epoch"], pytest.approx(h["loss"])) for h in resumed["history"]]
    assert run.data.metrics["accuracy"] == pytest.approx(resumed["accuracy"])

    # The same name with other settings is another experiment: refused before any training.
    other = subprocess.run([sys.executable, TRAIN, *common[:3], "5", *common[4:], "--run-name", "nightly",
                            "--output", str(tmp_path / "other")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "run 'nightly'" in other.stderr and "epochs 3 -> 5" in other.stderr and not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def head(s3):
    """A head node on loopback with one CPU, for the module's lost nodes; stopped after."""
    cluster = LocalCluster(num_cpus=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_nodes(head, tmp_path_factory):
    """The module's head and a new worker node of one CPU, with its own --temp-dir, sharing no disk with the head;
    the test loses it."""
    return head, head.add_worker_node(num_cpus=1, private=not_shared(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def bucket(s3):
    return s3.bucket("recovery")


def train_and_lose_the_worker_node(two_nodes, data_dir, checkpoints: str, tmp_path, *extra: str,
                                   env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Train with one worker on each node, checkpoints in `checkpoints`, and SIGKILL every process of the
    worker node at once (a machine lost) once a checkpoint is registered; returns the still running driver
    and its log. (Its raylet alone is not enough: a training worker that no longer needs the raylet, its
    data in memory, trains on for a while, and the run can end first.)"""
    cluster, worker_node = two_nodes
    log = tmp_path / "driver.log"
    driver = start_driver(
        ["--data-dir", str(data_dir), "--epochs", str(EPOCHS), "--batch-size", "64",
         "--num-workers", "2", "--cpus-per-worker", "1", *extra,
         "--storage-path", checkpoints, "--run-name", "two-nodes", "--output", str(tmp_path / "out")],
        log,
        # After the loss a run first waits this long for all its workers (Ray's default: 60 s, time an
        # autoscaler gets to bring a replacement).
        env={**cluster.env, "RAY_ADDRESS": cluster.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3", **(env or {})},
    )
    wait_for_checkpoint(f"{checkpoints}/two-nodes", driver, log)
    node = cluster.processes([worker_node])
    assert any(p.name().startswith("ray::RayTrainWorker") for p in node), "no training worker ran on the worker node"
    for p in node:
        p.send_signal(signal.SIGKILL)
    registered = latest_checkpoint_epoch(f"{checkpoints}/two-nodes")
    assert registered < EPOCHS, f"training ended (epoch {registered} registered) before the node was lost"
    return driver, log


def latest_checkpoint_epoch(run_dir: str) -> int:
    snapshot = json.loads(storage.Place.of(f"{run_dir}/checkpoint_manager_snapshot.json").read_bytes())
    return snapshot["latest_checkpoint_result"]["metrics"]["epoch"]


def test_a_lost_node_leaves_an_elastic_run_to_finish_on_the_rest(two_nodes, data_dir, bucket, tmp_path):
    driver, log = train_and_lose_the_worker_node(two_nodes, data_dir, f"{bucket}/elastic", tmp_path, "--min-workers", "1")
    out = finish(driver, log)
    assert driver.returncode == 0, out[-3000:]
    assert "training resumed from the checkpoint after epoch" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    history = metrics["history"]
    assert history[-1]["epoch"] == EPOCHS and history[-1]["workers"] == 1
    assert metrics["count"] == 500 and metrics["accuracy"] > 0.7


def test_a_lost_node_fails_a_fixed_size_run_with_a_clear_message(two_nodes, data_dir, bucket, tmp_path):
    # Two tries of 3 s to place both workers again, not the default eleven (the message counts them).
    driver, log = train_and_lose_the_worker_node(two_nodes, data_dir, f"{bucket}/fixed", tmp_path,
                                                 env={"CLF_PLACEMENT_TRIES": "2"})
    out = finish(driver, log)
    assert driver.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("train.py: error:")]
    assert errors == [
        "train.py: error: training failed: after a failure, 2 workers could not be placed again in 2 tries "
        "(a node lost for good?); with --min-workers a run goes on with the workers that fit"
    ]
    assert not (tmp_path / "out").exists()
