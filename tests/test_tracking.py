"""MLflow tracking against a real store (SQLite in a temporary folder), read back with MLflow's own client. The
run tracked here is the session's `one_epoch` (jobs/train.py as a user runs it, with --tracking-uri); a resumed
run continuing its MLflow run is checked in test_recovery.py, a tagging run's link to its model in test_tag.py,
a search's nested runs in test_search.py."""

import dataclasses
import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from clf import tracking
from clf.config import TrainConfig
from tests.helpers import ROOT


def training_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("clf")
    return client.search_runs([experiment.experiment_id], filter_string="tags.`clf.kind` = 'training'")


@pytest.mark.slow
def test_a_training_run_is_one_mlflow_run_holding_what_its_folder_holds(one_epoch):
    metrics = one_epoch.metrics
    [run] = training_runs(one_epoch.tracking_uri)
    client = MlflowClient(one_epoch.tracking_uri)
    assert run.info.status == "FINISHED" and run.info.run_name == metrics["config"]["run_name"]

    # Every setting as a param, as the run used it.
    assert run.data.params == {k: str(v) for k, v in metrics["config"].items() if k != "tracking_uri"}
    assert set(run.data.params) == {f.name for f in dataclasses.fields(TrainConfig)} - {"tracking_uri"}
    assert run.data.tags["clf.run"] == metrics["config"]["run_name"]
    assert run.data.tags["clf.data"] == metrics["data_identity"]
    assert run.data.tags["mlflow.source.git.commit"] == (metrics["provenance"]["git_commit"] or "unknown")

    # Every epoch's record, logged as the epoch ended (step = epoch), equal to metrics.json's history.
    for key, name in (("loss", "loss"), ("accuracy", "train_accuracy"), ("images_per_s", "images_per_s")):
        logged = client.get_metric_history(run.info.run_id, name)
        assert [(m.step, m.value) for m in logged] == [(h["epoch"], pytest.approx(h[key])) for h in metrics["history"]]
    # Logged while the run went on, not all at the end: the epoch's metric is older than the final accuracy.
    [epoch_loss] = client.get_metric_history(run.info.run_id, "loss")
    [final] = client.get_metric_history(run.info.run_id, "accuracy")
    assert epoch_loss.timestamp < final.timestamp

    # The final metrics equal metrics.json's.
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    for name, precision, recall in zip(metrics["classes"], metrics["precision"], metrics["recall"]):
        assert run.data.metrics[f"precision/{name}"] == pytest.approx(precision)
        assert run.data.metrics[f"recall/{name}"] == pytest.approx(recall)

    # The outputs as artifacts, the checkpoint among them; the checkpoint names the MLflow run.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.json", "history.png", "checkpoint"} <= artifacts, artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} >= {"checkpoint/model.json"}
    model = json.loads((one_epoch.output / "checkpoint" / "model.json").read_text())
    assert model["mlflow_run_id"] == run.info.run_id


def test_an_unreachable_tracking_server_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--tracking-uri", "http://127.0.0.1:9",
                           "--output", str(out), "--storage-path", str(tmp_path / "storage")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("train.py: error: --tracking-uri http://127.0.0.1:9 cannot be reached"), proc.stderr
    assert not out.exists() and not (tmp_path / "storage").exists()


def test_a_tracking_failure_mid_run_is_one_warning_and_the_rest_goes_on(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker.start(uri, "train.py", "nightly")
    tracker.metrics({"loss": 0.5}, step=1)
    MlflowClient(uri).delete_run(tracker.run_id)  # the store refuses what comes next: the run is deleted
    tracker.metrics({"loss": 0.4}, step=2)
    tracker.params({"lr": 0.01})
    tracker.end()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: warning: tracking to MLflow stopped (metrics: "), err
    assert err[0].endswith("the run goes on, its own outputs are complete")
    assert [m.value for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss")] == [0.5]


def test_a_continued_run_adds_new_params_and_keeps_the_first_starts_values(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.Tracker.start(uri, "train.py", "nightly")
    first.params({"epochs": 4, "output": "runs/first"})
    first.end("KILLED")
    again = tracking.Tracker.start(uri, "train.py", "nightly", run_id=first.run_id)  # a resumed run
    again.params({"epochs": 4, "output": "runs/second", "ray_logs": False})
    again.metrics({"loss": 0.5}, step=2)
    again.end()
    assert capsys.readouterr().err == ""  # no warning: tracking went on
    run = MlflowClient(uri).get_run(first.run_id)
    assert run.data.params == {"epochs": "4", "output": "runs/first", "ray_logs": "False"}
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.5}


def test_a_resumed_run_whose_mlflow_run_is_gone_is_tracked_as_a_new_one_with_one_warning(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.Tracker.start(uri, "train.py", "nightly")
    first.end("KILLED")
    MlflowClient(uri).delete_run(first.run_id)  # deleted by someone, as its checkpoints still name it
    again = tracking.Tracker.start(uri, "train.py", "nightly", run_id=first.run_id)
    again.metrics({"loss": 0.5}, step=2)
    again.end()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train.py: warning: MLflow run {first.run_id} cannot be continued ("), err
    assert err[0].endswith("this run is tracked as a new MLflow run")
    assert again.run_id != first.run_id
    run = MlflowClient(uri).get_run(again.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.5}


def test_an_epoch_trained_again_after_ctrl_c_is_logged_at_its_step_once(tmp_path):
    """Ctrl-C after epoch 2 was reported, before Ray Train registered its checkpoint: the run resumes from epoch 1
    and trains epoch 2 again. Its step keeps one value (the first), and epoch 3 is logged as any other."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.Tracker.start(uri, "train.py", "nightly")
    for epoch, loss in ((1, 0.9), (2, 0.7)):
        first.epoch({"epoch": epoch, "loss": loss, "accuracy": 0.5})
    first.end("KILLED")
    again = tracking.Tracker.start(uri, "train.py", "nightly", run_id=first.run_id)
    for epoch, loss in ((2, 0.7), (3, 0.6)):
        again.epoch({"epoch": epoch, "loss": loss, "accuracy": 0.6})
    again.end()
    history = MlflowClient(uri).get_metric_history(first.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.9), (2, 0.7), (3, 0.6)]
    accuracy = MlflowClient(uri).get_metric_history(first.run_id, "train_accuracy")
    assert sorted((m.step, m.value) for m in accuracy) == [(1, 0.5), (2, 0.5), (3, 0.6)]
