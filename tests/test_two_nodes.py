"""A real two-node cluster on loopback (a head from `ray start` and one more node, 2 CPUs each, each with its
own temp dir, token authentication on): jobs submitted with `ray job submit` size themselves per node, run
a worker on each node, and record where each worker and actor ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.catalog import write_broken, write_catalog
from tests.helpers import ROOT, real_dataset_dir
from tests.ray_cluster import LocalCluster

pytestmark = pytest.mark.slow

TRAIN = str(ROOT / "jobs" / "train.py")


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(num_cpus=2).start()
    try:
        c.add_worker_node(num_cpus=2)
        yield c
    finally:
        c.stop()
    assert c.processes() == []


@pytest.fixture(scope="module")
def data_dir(real_data, tmp_path_factory):
    return real_dataset_dir(real_data, tmp_path_factory.mktemp("data"), n_train=6000, n_test=1000)


def node_ids(cluster) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(); print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"],
        env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def submit_training(cluster, data_dir, out, *flags):
    proc = cluster.submit("python", "jobs/train.py", "--epochs", "1", "--data-dir", str(data_dir), "--output", str(out),
                          "--storage-path", str(out.parent / "storage"), *flags, working_dir=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return json.loads((out / "metrics.json").read_text()), log


def test_without_sizing_flags_one_worker_per_node_sized_to_it(cluster, data_dir, tmp_path):
    metrics, log = submit_training(cluster, data_dir, tmp_path / "run")
    assert metrics["plan"]["training"] == {
        "num_workers": 2, "min_workers": 2, "cpus_per_worker": 2, "use_gpu": False, "placement": "SPREAD",
        "waits_for_nodes": False,
    }
    assert set(metrics["placement"]["training_workers"]) == node_ids(cluster)  # one per node, within its 2 CPUs
    assert "is a local path" in log  # the note about --storage-path on more than one node

    # Complete and correct: the metrics are those of the predictions written.
    rows = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert sorted(rows["id"]) == list(range(1000)) and metrics["count"] == 1000
    assert metrics["accuracy"] == pytest.approx(np.mean(rows["label"] == rows["prediction"]), abs=1e-6)
    actors = metrics["placement"]["inference_actors"]
    assert sum(a["rows"] for a in actors) == 1000 and {a["node"] for a in actors} <= node_ids(cluster)


def test_two_workers_of_one_cpu_spread_across_the_nodes_like_a_one_node_run(cluster, data_dir, tmp_path):
    flags = ["--num-workers", "2", "--cpus-per-worker", "1", "--seed", "3"]
    two_nodes, _ = submit_training(cluster, data_dir, tmp_path / "two", *flags)
    workers = two_nodes["placement"]["training_workers"]
    assert len(workers) == 2 and set(workers) == node_ids(cluster)  # DDP across the two nodes

    # The same flags and seed in an embedded Ray on this one machine.
    one = tmp_path / "one"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, TRAIN, "--epochs", "1", "--data-dir", str(data_dir), "--output", str(one),
                           "--storage-path", str(tmp_path / "storage-one"), *flags],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_node = json.loads((one / "metrics.json").read_text())
    assert len(set(one_node["placement"]["training_workers"])) == 1
    assert abs(two_nodes["accuracy"] - one_node["accuracy"]) <= 0.002


def test_tagging_uses_predictor_actors_on_both_nodes(cluster, real_data, tmp_path):
    checkpoint = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "tests.programs", "untrained-checkpoint", str(checkpoint)], check=True,
                   cwd=ROOT, timeout=120)
    paths = write_catalog(tmp_path / "photos", real_data.test.images[:300])
    broken = write_broken(tmp_path / "photos" / "broken")
    proc = cluster.submit("python", "jobs/tag.py", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "photos"),
                          "--output", str(tmp_path / "tags"), "--batch-size", "32", working_dir=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    rows = pd.read_parquet(tmp_path / "tags" / "tags.parquet")
    assert sorted(rows["path"]) == sorted(
        [str(p.resolve()) for p in paths] + [str((tmp_path / "photos" / "broken" / n).resolve()) for n in broken]
    )
    assert "predictor actors ran on 2 node(s)" in log


def test_a_stores_catalog_trains_with_a_worker_on_each_node(cluster, small_catalog, tmp_path):
    out = tmp_path / "catalog-run"
    proc = cluster.submit("python", "jobs/train.py", "--train-data", str(small_catalog), "--epochs", "2",
                          "--batch-size", "32", "--output", str(out), "--storage-path", str(tmp_path / "storage"),
                          working_dir=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["placement"]["training_workers"]) == node_ids(cluster)  # a shard on each node
    assert metrics["count"] == 16 and len(pd.read_parquet(out / "predictions.parquet")) == 16
