"""The whole job on the real data, checked against an independent recomputation."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clf import checkpoint, data
from clf.infer import check_complete, predict
from clf.runtime import InferPlan
from tests.console_lines import EPOCH
from tests.helpers import ROOT, html_references

pytestmark = pytest.mark.slow


def test_embedded_ray_listens_on_loopback_only(one_epoch):
    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert {ip for _, ip in one_epoch.listening} & loopback, "no listening sockets seen: the check saw nothing"
    elsewhere = {(name, ip) for name, ip in one_epoch.listening if ip not in loopback}
    # One known exception: torch.distributed's TCPStore, which rank 0 of the process group serves while
    # training, binds every interface (PyTorch offers no bind address for it). Every Ray server is on
    # loopback. Ray renames a worker's process after the task it runs ("ray::RayTrainWorker.run_train_fn"
    # while training), so the check goes by the actor's name.
    assert all(name.split(".")[0] == "ray::RayTrainWorker" for name, _ in elsewhere), elsewhere


def test_prints_each_epoch_and_the_ending(one_epoch):
    lines = one_epoch.log.splitlines()
    assert sum(bool(EPOCH.fullmatch(line)) for line in lines) == 1
    assert any(line.startswith("accuracy 0.") and line.endswith(" over 10,000 test images") for line in lines)
    assert any(line.startswith("weakest classes (recall): ") for line in lines)


def test_accuracy_and_result_object(one_epoch, real_data):
    assert one_epoch.accuracy >= 0.85
    assert len(one_epoch.predictions) == 10_000
    assert len(one_epoch.precision) == len(one_epoch.recall) == 10
    assert one_epoch.classes == list(data.CLASSES)
    # The predictions list is in test-set order: its accuracy against the true labels is the reported one.
    assert np.mean(np.array(one_epoch.predictions) == real_data.test.labels) == pytest.approx(one_epoch.accuracy)


def test_metrics_json_equals_a_recomputation_from_predictions(one_epoch, real_data):
    metrics = json.loads((one_epoch.output / "metrics.json").read_text())
    rows = pd.read_parquet(one_epoch.output / "predictions.parquet")
    assert list(rows.columns) == ["id", "label", "prediction", "confidence"]
    assert sorted(rows["id"]) == list(range(10_000))
    rows = rows.set_index("id").sort_index()
    np.testing.assert_array_equal(rows["label"].to_numpy(), real_data.test.labels)
    assert rows["confidence"].between(0.1, 1.0).all()  # softmax max over 10 classes is at least 0.1

    # Independent of torchmetrics: count by hand.
    y, p = rows["label"].to_numpy(), rows["prediction"].to_numpy()
    # torchmetrics computes in float32: equal to within its precision.
    assert metrics["accuracy"] == pytest.approx(np.mean(y == p), abs=1e-6)
    for c in range(10):
        tp = np.sum((p == c) & (y == c))
        assert metrics["precision"][c] == pytest.approx(tp / np.sum(p == c), abs=1e-6)
        assert metrics["recall"][c] == pytest.approx(tp / np.sum(y == c), abs=1e-6)
    assert metrics["classes"] == list(data.CLASSES)
    assert {"batch_size", "lr", "epochs"} <= set(metrics["config"])
    assert metrics["config"]["epochs"] == 1
    assert {"load_data_s", "train_s", "inference_s", "total_s"} <= set(metrics["timings"])
    assert metrics["provenance"]["packages"]["ray"]
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert metrics["plan"]["training"] == {"num_workers": 1, "min_workers": 1, "cpus_per_worker": 2, "use_gpu": False,
                                          "placement": "SPREAD", "waits_for_nodes": False}
    assert metrics["plan"]["inference"]["num_actors"] >= 1
    assert len(metrics["placement"]["training_workers"]) == 1
    assert sum(actor["rows"] for actor in metrics["placement"]["inference_actors"]) == 10_000
    assert metrics["skipped_files"] == [] and metrics["data_identity"] == "fashion-mnist"


def test_outputs_are_complete_and_nothing_half_written_remains(one_epoch):
    assert sorted(p.name for p in one_epoch.output.iterdir()) == [
        "checkpoint", "confusion_matrix.png", "history.png", "metrics.json", "mistakes.png", "per_class.png",
        "predictions.parquet", "report.html",
    ]
    assert not [p for p in one_epoch.output.parent.iterdir() if ".partial-" in p.name]


def test_checkpoint_loads_without_ray(one_epoch, real_data):
    images = one_epoch.output.parent / "first100.npy"
    np.save(images, real_data.test.images[:100])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.programs", "predict-without-ray", str(one_epoch.output / "checkpoint"), str(images)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == one_epoch.predictions[:100]


def test_shuffled_inference_gives_the_same_predictions(ray_local, one_epoch, real_data):
    # One actor on one CPU: the shuffle's tasks need the other.
    shuffled = data.to_ray_dataset(real_data.test).random_shuffle(seed=0)
    rows = predict(shuffled, checkpoint.read(str(one_epoch.output / "checkpoint")), InferPlan(1, 1, False), batch_size=1024)
    rows = check_complete(rows.to_pandas(), real_data.prepare().eval_rows)
    assert rows["prediction"].tolist() == one_epoch.predictions


def test_report_html_shows_local_figures_and_the_metrics(one_epoch):
    html = (one_epoch.output / "report.html").read_text()
    found = html_references(html)
    images = [value for tag, value in found if tag == "img"]
    assert len(images) == 4  # confusion matrix, per-class bars, history, mistakes
    for _, ref in found:
        assert "://" not in ref and not ref.startswith("/"), f"{ref}: the report must work offline and moved"
        path = one_epoch.output / ref
        assert path.is_file(), f"report.html references {ref}, which is not there"
        with Image.open(path) as image:
            image.verify()  # a real PNG, not an empty file
    assert f"{one_epoch.accuracy:.2%}" in html
    for name in data.CLASSES:
        assert name in html
