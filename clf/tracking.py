"""MLflow tracking of the jobs' runs, off unless a tracking URI is given (--tracking-uri, or MLFLOW_TRACKING_URI).

The driver is the one writer: training's workers never reach the tracking store (each epoch's record comes to
the driver through the run's noticeboard, and is logged there as the epoch finishes). A training run logs every
setting as a param; per epoch its loss, train accuracy, images/s (and validation accuracy when held out); at
the end accuracy and per-class precision and recall, and its outputs (report, metrics.json, figures,
checkpoint) as artifacts; tags for the run's name, the git commit and the data's identity. The MLflow run's id
is kept in every checkpoint, so a resumed run continues the same MLflow run, and in the checkpoint's
model.json, so the runs that tag or serve with the model can name it.

A store that cannot be reached at the start is a usage error (one line, exit 2) before any work; a failure
later is one warning, and the job's own outputs are complete without it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
import posixpath
import sys
from pathlib import Path

from clf.errors import ConfigError, Interrupted, first_line

TRACKING_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
EXPERIMENT = "clf"
# MLflow's HTTP client retries a failed request 7 times with backoff (minutes in all) by default: a job waits
# for a tracking server only briefly.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(given: str | None) -> str | None:
    """The URI a job tracks to: the flag, else MLFLOW_TRACKING_URI, else None (no tracking)."""
    return given or os.environ.get(TRACKING_ENV) or None


class Tracker:
    """One MLflow run, written by this process. Every call after the start is allowed to fail: the first
    failure is a warning on stderr, and the tracker stops trying."""

    def __init__(self, client, run_id: str, prog: str, uri: str, epochs_logged: set[int] | None = None):
        self.client, self.run_id, self.prog, self.uri, self.working = client, run_id, prog, uri, True
        self.epochs_logged = epochs_logged or set()

    @classmethod
    def start(cls, uri: str, prog: str, name: str, run_id: str | None = None, tags: dict | None = None) -> Tracker:
        """A new run of the experiment (MLFLOW_EXPERIMENT_NAME, else "clf"), or the run `run_id` continued (a new
        one, with a warning, when that one cannot be: deleted, or in another store). ConfigError when the store
        cannot be reached."""
        client = connect(uri)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                logged = {m.step for m in client.get_metric_history(run_id, "loss")}
                return cls(client, run_id, prog, uri, logged)
            except Exception as e:  # noqa: BLE001 - deleted, or kept in another store: never a reason to stop a resume
                print(f"{prog}: warning: MLflow run {run_id} cannot be continued ({first_line(e)}); this run is "
                      "tracked as a new MLflow run", file=sys.stderr, flush=True)
        try:
            run_id = client.create_run(_experiment(client, uri), run_name=name, tags=tags or {}).info.run_id
        except Exception as e:  # noqa: BLE001 - MLflow raises its own, and requests', and sqlalchemy's errors
            raise ConfigError(f"--tracking-uri {uri}: the run could not be started ({first_line(e)})") from None
        return cls(client, run_id, prog, uri)

    def _do(self, what: str, call) -> None:
        if not self.working:
            return
        try:
            call()
        except Exception as e:  # noqa: BLE001 - tracking is not worth the run: one warning, the outputs stay whole
            self.working = False
            print(f"{self.prog}: warning: tracking to MLflow stopped ({what}: {first_line(e)}); the run goes on, "
                  "its own outputs are complete", file=sys.stderr, flush=True)

    def params(self, values: dict) -> None:
        """Log `values` as params; on a continued run, only those not logged yet (MLflow's params cannot change:
        a resumed run keeps the settings that matter, and where others differ, such as its --output, the
        first start's value stays)."""
        from mlflow.entities import Param

        def log():
            logged = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)) for k, v in values.items() if k not in logged]
            if new:
                self.client.log_batch(self.run_id, params=new)

        self._do("params", log)

    def tags(self, values: dict) -> None:
        from mlflow.entities import RunTag

        self._do("tags", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()]))

    def metrics(self, values: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        at = int(time.time() * 1000)
        self._do("metrics", lambda: self.client.log_batch(
            self.run_id, metrics=[Metric(metric_key(k), float(v), at, step or 0) for k, v in values.items()]))

    def epoch(self, record: dict) -> None:
        """An epoch's record, at its step, once: a start stopped by Ctrl-C after an epoch was reported but before
        Ray Train registered its checkpoint trains that epoch again when it resumes, and MLflow cannot take a
        logged value back; the first values stay (the same values, where training is deterministic)."""
        if record["epoch"] not in self.epochs_logged:
            self.epochs_logged.add(record["epoch"])
            self.metrics(epoch_metrics(record), step=record["epoch"])

    def artifacts(self, folder: Path) -> None:
        """Every file in `folder` and below."""
        self._do("artifacts", lambda: self.client.log_artifacts(self.run_id, str(folder)))

    def artifact(self, file: Path) -> None:
        self._do("artifacts", lambda: self.client.log_artifact(self.run_id, str(file)))

    def end(self, status: str = "FINISHED") -> None:
        self._do("end", lambda: self.client.set_terminated(self.run_id, status=status))


@contextmanager
def ended_on_failure(tracker: Tracker | None):
    """A failure (Ctrl-C included) of what the block runs ends the MLflow run as failed, or killed."""
    try:
        yield
    except BaseException as e:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(e, (KeyboardInterrupt, Interrupted)) else "FAILED")
        raise


def find_run(uri: str, name: str, kind: str) -> str | None:
    """The id of the latest MLflow run named `name` of this kind (tag clf.kind) in the experiment, if any."""
    client = connect(uri)
    found = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV) or EXPERIMENT)
    if found is None:
        return None
    name = name.replace("'", "")
    runs = client.search_runs([found.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"attributes.run_name = '{name}' and tags.`clf.kind` = '{kind}'")
    return runs[0].info.run_id if runs else None


def connect(uri: str):
    """An MLflow client of `uri`, once the store answered; ConfigError (one line, exit 2) if it does not."""
    os.environ.update({k: v for k, v in HTTP_ENV.items() if k not in os.environ})
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store unless told
    try:
        from mlflow import MlflowClient

        # Their notes on a new store's tables are not the job's lines (after the import: MLflow sets its
        # loggers' levels as it loads).
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - whatever the store's client raises: it cannot be used
        raise ConfigError(f"--tracking-uri {uri} cannot be reached ({first_line(e)})") from None
    return client


def _experiment(client, uri: str) -> str:
    name = os.environ.get(EXPERIMENT_ENV) or EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A local SQLite store keeps the artifacts beside its database, not in the working directory (MLflow's
    # default for it: ./mlruns).
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(posixpath.dirname(uri[len("sqlite:///"):]) or ".").resolve().joinpath("mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def metric_key(name: str) -> str:
    """`name` in the characters MLflow allows in a metric's key (letters, digits, _ - . / and spaces)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def training_params(cfg) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "tracking_uri"}


def epoch_metrics(record: dict) -> dict:
    names = {"loss": "loss", "accuracy": "train_accuracy", "images_per_s": "images_per_s",
             "val_loss": "val_loss", "val_accuracy": "val_accuracy"}
    return {names[k]: v for k, v in record.items() if k in names}


def final_metrics(scores, classes: list[str]) -> dict:
    values = {"accuracy": scores.accuracy}
    for name, precision, recall in zip(classes, scores.precision, scores.recall):
        values[f"precision/{name}"] = precision
        values[f"recall/{name}"] = recall
    return values
