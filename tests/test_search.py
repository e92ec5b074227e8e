"""jobs/tune.py as a user runs it: a tiny search on a small part of the real data, interrupted by Ctrl-C and
started again (it resumes), ASHA stopping a weak trial, the best chosen by validation accuracy and trained as a
normal run, each trial a nested MLflow run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow import MlflowClient

from clf import search
from tests.helpers import ROOT, real_dataset_dir

TUNE = str(ROOT / "jobs" / "tune.py")
pytestmark = pytest.mark.slow


def wait_for_line(proc: subprocess.Popen, log, pattern: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(), re.MULTILINE):
        if proc.poll() is not None:
            pytest.fail(f"the search ended (exit {proc.returncode}) before {pattern!r}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {pattern!r} within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_a_search_interrupted_resumes_stops_the_weak_early_and_trains_the_best_by_validation(real_data, tmp_path):
    data_dir = real_dataset_dir(real_data, tmp_path / "data", n_train=4000, n_test=500)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, storage = tmp_path / "best", tmp_path / "storage"
    # Three trials, one epoch at least (ASHA's grace), two at most; one worker of one CPU each, so two at a time
    # on the two cores CI has.
    args = [TUNE, "--trials", "3", "--epochs", "2", "--data-dir", str(data_dir), "--output", str(out),
            "--storage-path", str(storage), "--run-name", "weekly", "--tracking-uri", uri,
            "--workers-per-trial", "1", "--cpus-per-worker", "1"]

    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for_line(first, log, r"^trial \d/3: epoch 1/2, validation accuracy")
    first.send_signal(signal.SIGINT)
    first.wait(timeout=120)
    console = log.read_text()
    assert first.returncode == 130, console[-3000:]
    assert console.strip().splitlines()[-1] == (
        f"tune.py: interrupted: search weekly keeps its state in {storage}/weekly; start it again with --run-name "
        "weekly (and the same settings) to resume it"), console[-3000:]
    assert "Traceback" not in console and not out.exists()

    second = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=ROOT)
    console = second.stdout + second.stderr
    assert second.returncode == 0, console[-3000:]
    assert f"search weekly: resuming it from {storage}/weekly" in console
    assert "Traceback" not in console

    # trials.csv: every trial once, with its settings from the search space, best first.
    trials = pd.read_csv(out / "trials.csv", keep_default_na=False)
    assert list(trials.columns) == search.COLUMNS and sorted(trials["trial"]) == [1, 2, 3]
    assert (trials["error"] == "").all(), trials
    for name, (kind, *bounds) in search.SPACE.items():
        if kind == "choice":
            assert set(trials[name]) <= set(bounds[0]), (name, trials[name])
        else:
            assert trials[name].between(bounds[0], bounds[1]).all(), (name, trials[name])
    assert list(trials["val_accuracy"]) == sorted(trials["val_accuracy"], reverse=True)
    # ASHA stopped at least one after its first epoch; the others ran both.
    assert trials["stopped_early"].any(), trials
    assert (trials["epochs"] == trials["stopped_early"].map({True: 1, False: 2})).all(), trials

    # The best by validation accuracy, trained as a normal run: its settings, its test-set metrics.
    metrics = json.loads((out / "metrics.json").read_text())
    best = trials.iloc[0]
    for name in search.SPACE:
        assert metrics["config"][name] == pytest.approx(best[name]), name
    assert metrics["count"] == 500 and 0.5 < metrics["accuracy"] <= 1  # the test set, only after selection
    assert metrics["config"]["validation"] is False  # the final run trains on all training images
    assert {"report.html", "checkpoint", "predictions.parquet"} <= {p.name for p in out.iterdir()}
    assert f"best settings, validation accuracy {best['val_accuracy']:.4f}" in console
    assert console.strip().splitlines()[-1] == f"outputs in {out}: trials.csv, report.html, metrics.json, checkpoint/"

    # MLflow: the search's run, its trials nested in it (each trial once, resumed or not), and the final run.
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("clf").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("clf.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished_trials = [r for r in children if r.data.tags.get("clf.kind") == "trial" and r.info.status == "FINISHED"]
    assert len(finished_trials) == 3, [(r.info.run_name, r.info.status) for r in children]
    assert sorted(r.data.metrics["val_accuracy"] for r in finished_trials) == pytest.approx(sorted(trials["val_accuracy"]))
    [final] = [r for r in children if r.data.tags.get("clf.kind") == "training"]
    assert final.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"]) and final.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])
