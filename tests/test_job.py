"""The whole job on the real data (`jobs/train.py --epochs 1`, as a user runs it), checked against an
independent recomputation: what it prints, writes, listens on and leaves behind."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clf import data
from tests.console_lines import EPOCH, PROGRESS, check_only_ours
from tests.helpers import ROOT, html_references

pytestmark = pytest.mark.slow


def test_embedded_ray_listens_on_loopback_only(one_epoch):
    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert {ip for _, ip in one_epoch.listening} & loopback, "no listening sockets seen: the check saw nothing"
    elsewhere = {(pid, ip) for pid, ip in one_epoch.listening if ip not in loopback}
    # One known exception: torch.distributed's TCPStore, which rank 0 of the process group serves while
    # training, binds every interface (PyTorch offers no bind address for it). Every Ray server is on
    # loopback. Ray renames a worker's process after the task it runs ("ray::RayTrainWorker" idle,
    # "ray::execute._setup_torch_process_group" while it opens the store, "ray::RayTrainWorker.run_train_fn"
    # while training), so the check goes by the process: one seen as a Ray Train worker at any time.
    train_workers = {pid for pid, names in one_epoch.titles.items()
                     if any(name.startswith("ray::RayTrainWorker") for name in names)}
    assert {pid for pid, _ in elsewhere} <= train_workers, {
        (ip, *sorted(one_epoch.titles.get(pid, ()))) for pid, ip in elsewhere}


def test_prints_only_its_own_lines_and_leaves_no_process(one_epoch):
    # Every console line one of ours (none of Ray's: its start, Ray Data's and Ray Train's lines, its C++ core's
    # error line for pool actors), 6 of them and a progress line every 10 s a phase lasts.
    lines = check_only_ours(one_epoch.stdout + one_epoch.stderr, at_most=12)
    kinds = [line.split()[0] for line in lines if not PROGRESS.fullmatch(line)]
    assert kinds == ["run", "training", "epoch", "accuracy", "weakest", "outputs"], lines
    assert sum(bool(EPOCH.fullmatch(line)) for line in lines) == 1
    assert lines[-1] == (f"outputs in {one_epoch.output}: report.html (the run's report), metrics.json, "
                         "predictions.parquet, checkpoint/")
    assert any(line.endswith(" over 10,000 test images") for line in lines)
    # jobs/*.py end with a quick exit that skips the interpreter's teardown (and Ray's atexit hook): Ray must
    # have been stopped before, every process of it.
    assert {"raylet", "gcs_server"} <= set().union(*one_epoch.titles.values())  # the embedded Ray was seen running
    assert not one_epoch.left_running, [" ".join(p.cmdline())[:80] for p in one_epoch.left_running]


def test_metrics_json_equals_a_recomputation_from_predictions(one_epoch, real_data):
    metrics = one_epoch.metrics
    rows = pd.read_parquet(one_epoch.output / "predictions.parquet")
    assert list(rows.columns) == ["id", "label", "prediction", "confidence"]
    assert sorted(rows["id"]) == list(range(10_000))
    rows = rows.set_index("id").sort_index()
    np.testing.assert_array_equal(rows["label"].to_numpy(), real_data.test.labels)
    assert rows["confidence"].between(0.1, 1.0).all()  # softmax max over 10 classes is at least 0.1

    # Independent of torchmetrics: count by hand.
    y, p = rows["label"].to_numpy(), rows["prediction"].to_numpy()
    assert metrics["accuracy"] >= 0.85
    assert metrics["accuracy"] == pytest.approx(np.mean(y == p), abs=1e-6)  # torchmetrics counts in float32
    for c in range(10):
        tp = np.sum((p == c) & (y == c))
        assert metrics["precision"][c] == pytest.approx(tp / np.sum(p == c), abs=1e-6)
        assert metrics["recall"][c] == pytest.approx(tp / np.sum(y == c), abs=1e-6)
    assert metrics["classes"] == list(data.CLASSES) and metrics["count"] == 10_000
    assert metrics["config"]["epochs"] == 1 and [h["epoch"] for h in metrics["history"]] == [1]
    assert metrics["provenance"]["packages"]["ray"]
    # One node: one worker with every CPU Ray found here, placed on it; the predictor actors too.
    training = metrics["plan"]["training"]
    assert training["num_workers"] == 1 and training["cpus_per_worker"] == os.cpu_count()
    assert len(metrics["placement"]["training_workers"]) == 1
    assert sum(actor["rows"] for actor in metrics["placement"]["inference_actors"]) == 10_000
    assert metrics["skipped_files"] == [] and metrics["data_identity"] == "fashion-mnist"


def test_every_second_of_training_is_on_the_record(one_epoch):
    metrics = one_epoch.metrics
    timings, line = metrics["timings"], metrics["training_timeline"]
    assert {"load_data_s", "ray_start_s", "train_s", "train_start_s", "train_end_s", "inference_s", "total_s"} <= set(timings)
    order = ["process", "train_fn", "shard_in_memory", "first_step", "last_step", "last_report_returned", "fit_returned"]
    assert [line[k] for k in order] == sorted(line[k] for k in order), line
    assert metrics["history"][0]["started"]["process"] == pytest.approx(line["fit_called_at"] + line["process"], abs=1e-3)

    # The record against what the console showed, as the lines came: "run ..." is said once Ray has started,
    # "training on" as fit() is called, the epoch's line once its report is in (the driver reads the board every
    # 0.5 s), the accuracy once evaluated and written (metrics.json's total_s taken just before, the MLflow
    # artifacts uploaded just after).
    def when(start: str) -> float:
        return next(at for at, text in one_epoch.lines if text.startswith(start))

    run, training, epoch, accuracy = when("run "), when("training on "), when("epoch 1/1: loss"), when("accuracy ")
    assert line["last_report_returned"] - 0.2 <= epoch - training <= line["last_report_returned"] + 1.5
    after_ray = timings["total_s"] - timings["load_data_s"] - timings["ray_start_s"]
    assert after_ray - 0.5 <= accuracy - run <= after_ray + 3
    assert accuracy - epoch >= timings["inference_s"]


def test_outputs_are_complete_and_nothing_half_written_remains(one_epoch):
    assert sorted(p.name for p in one_epoch.output.iterdir()) == [
        "checkpoint", "confusion_matrix.png", "history.png", "metrics.json", "mistakes.png", "per_class.png",
        "predictions.parquet", "report.html",
    ]
    assert not [p for p in one_epoch.output.parent.iterdir() if ".partial-" in p.name]


def test_evaluation_ran_on_onnx_runtime_with_torchs_classes_and_probabilities(one_epoch, real_data):
    """The predictor actors imported no torch; on every test image their class is the torch model's, and their
    confidence within 1e-5 of it."""
    import torch

    from clf import checkpoint

    assert one_epoch.predictors, "no predictor actor was seen"
    assert not any(one_epoch.predictors.values()), one_epoch.predictors
    model = checkpoint.inference_model(checkpoint.load_model(one_epoch.output / "checkpoint")[0])
    with torch.inference_mode():
        probabilities = model(torch.from_numpy(real_data.test.images)).numpy()
    rows = pd.read_parquet(one_epoch.output / "predictions.parquet").set_index("id").sort_index()
    np.testing.assert_array_equal(rows["prediction"].to_numpy(), probabilities.argmax(1))
    np.testing.assert_allclose(rows["confidence"].to_numpy(), probabilities.max(1), atol=1e-5)


def test_checkpoint_loads_without_ray_and_predicts_what_the_job_did(one_epoch, real_data):
    images = one_epoch.output.parent / "first100.npy"
    np.save(images, real_data.test.images[:100])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.programs", "predict-without-ray", str(one_epoch.output / "checkpoint"), str(images)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    predicted = pd.read_parquet(one_epoch.output / "predictions.parquet").set_index("id").sort_index()
    assert json.loads(proc.stdout) == predicted["prediction"].tolist()[:100]


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
    assert f"{one_epoch.metrics['accuracy']:.2%}" in html
    for name in data.CLASSES:
        assert name in html
