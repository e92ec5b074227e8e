"""jobs/tune.py as a user runs it: a tiny search on a small part of the real data, interrupted by Ctrl-C and
started again (it resumes), ASHA stopping a weak trial, the best chosen by validation accuracy and trained as a
normal run, each trial a nested MLflow run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
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
    data_dir = real_dataset_dir(real_data, tmp_path / "data", n_train=2000, n_test=300)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, storage = tmp_path / "best", tmp_path / "storage"
    # Two trials, one epoch at least (ASHA's grace), two at most; one worker of both CPUs each: one trial at a
    # time on the two cores the embedded Ray has.
    args = [TUNE, "--trials", "2", "--epochs", "2", "--data-dir", str(data_dir), "--output", str(out),
            "--storage-path", str(storage), "--run-name", "weekly", "--tracking-uri", uri,
            "--workers-per-trial", "1", "--cpus-per-worker", "2"]

    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    wait_for_line(first, log, r"^trial 1/2: epoch 1/2, validation accuracy")
    first.send_signal(signal.SIGINT)
    first.wait(timeout=120)
    console = log.read_text()
    assert first.returncode == 130, console[-3000:]
    assert console.strip().splitlines()[-1] == (
        f"tune.py: interrupted: search weekly keeps its state in {storage}/weekly; start it again with --run-name "
        "weekly (and the same settings) to resume it"), console[-3000:]
    assert "Traceback" not in console and not out.exists()
    assert "2 settings on 1,834 images (validation: 166), 1 trial(s) at a time of 1 worker(s) x 2 CPU" in console

    second = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    console = second.stdout + second.stderr
    assert second.returncode == 0, console[-3000:]
    assert f"search weekly: resuming it from {storage}/weekly" in console and "Traceback" not in console
    # One trial at a time: each starts once the one before has ended (finished, or stopped by ASHA).
    lines = [line for line in console.splitlines() if line.startswith("trial ")]
    started = [i for i, line in enumerate(lines) if re.match(r"trial \d/2: lr ", line)]
    for before, after in zip(started, started[1:]):
        assert all(lines[i].startswith(lines[before].split(":")[0]) for i in range(before, after)), lines
    assert "trial 1/2: lr " in console  # unfinished when interrupted: run again, from its first epoch

    # trials.csv: every trial once, with its settings from the search space, best first.
    trials = pd.read_csv(out / "trials.csv", keep_default_na=False)
    assert list(trials.columns) == search.COLUMNS and sorted(trials["trial"]) == [1, 2]
    assert (trials["error"] == "").all(), trials
    for name, (kind, *bounds) in search.SPACE.items():
        if kind == "choice":
            assert set(trials[name]) <= set(bounds[0]), (name, trials[name])
        else:
            assert trials[name].between(bounds[0], bounds[1]).all(), (name, trials[name])
    assert list(trials["val_accuracy"]) == sorted(trials["val_accuracy"], reverse=True)

    # ASHA (reduction factor 2) at the first epoch: a trial goes on if its validation accuracy then is at least
    # the median of the first-epoch results recorded before it, else it stops there. The trials ran in turn after
    # the resume (Tune's restore starts ASHA's record anew), so those are the trials before it: checked against each
    # trial's epochs, as MLflow has them.
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("clf").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("clf.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = {int(r.info.run_name.rsplit(" ", 1)[-1]): r for r in children
                if r.data.tags.get("clf.kind") == "trial" and r.info.status == "FINISHED"}
    assert sorted(finished) == [1, 2], [(r.info.run_name, r.info.status) for r in children]
    first_epoch = {n: next(m.value for m in client.get_metric_history(r.info.run_id, "val_accuracy") if m.step == 1)
                   for n, r in finished.items()}
    by_trial = trials.set_index("trial")
    for n in (1, 2):
        before = [first_epoch[k] for k in range(1, n)]
        goes_on = not before or first_epoch[n] >= np.median(before)
        assert by_trial.loc[n, "epochs"] == (2 if goes_on else 1), (n, first_epoch, trials)
        assert by_trial.loc[n, "stopped_early"] == (not goes_on)
    assert trials["stopped_early"].any(), trials  # this seed's draws: the second is weaker than the first

    # The best by validation accuracy, trained as a normal run on every CPU: the trials' placement groups are
    # gone (a run plans on what is free), its settings, its test-set metrics.
    metrics = json.loads((out / "metrics.json").read_text())
    best = trials.iloc[0]
    for name in search.SPACE:
        assert metrics["config"][name] == pytest.approx(best[name]), name
    plan = metrics["plan"]["training"]
    assert not plan["sized_to_free"] and plan["num_workers"] * plan["cpus_per_worker"] == 2, plan
    assert metrics["count"] == 300 and 0.5 < metrics["accuracy"] <= 1  # the test set, only after selection
    assert metrics["config"]["validation"] is False  # the final run trains on all training images
    assert {"report.html", "checkpoint", "predictions.parquet"} <= {p.name for p in out.iterdir()}
    assert f"best settings, validation accuracy {best['val_accuracy']:.4f}" in console
    assert console.strip().splitlines()[-1] == f"outputs in {out}: trials.csv, report.html, metrics.json, checkpoint/"
    [final] = [r for r in children if r.data.tags.get("clf.kind") == "training"]
    assert final.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"]) and final.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])
