"""The training job, top to bottom: load the data, connect to Ray and plan, fit, evaluate the test set,
compute the metrics, write the outputs.

`run()` is what `jobs/train.py` calls and what Python users call. Outputs are written into a hidden folder
beside `--output` and renamed into place only when all of them are written, so a folder named like a run
is always a complete run. With tracking, everything after the MLflow run starts ends it FAILED (or KILLED)
if it fails, a refusal included.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from clf import catalog, data, plan, report, session, storage, tracking
from clf import checkpoint as ckpt
from clf.config import TrainConfig
from clf.plan import Cluster, InferPlan, TrainPlan, placement_tries
from clf.cluster import cluster_nodes

if TYPE_CHECKING:
    from clf.metrics import Metrics

# Imported while Ray starts, not before (run()): see session.importing.
WHILE_RAY_STARTS = ("clf.metrics", "clf.trainer", "clf.infer")


@dataclass(frozen=True)
class RunResult:
    predictions: list[int]  # predicted class of each evaluation image, in id order (Fashion-MNIST: test-set order)
    accuracy: float
    precision: list[float]  # per class, class-index order
    recall: list[float]
    classes: list[str]
    output: str  # a folder on the driver's disk, or a URI
    history: list[dict] = field(default_factory=list)  # the record of every epoch
    timings: dict = field(default_factory=dict)  # seconds per phase


class Stopwatch:
    """Seconds per phase of the run, for metrics.json's `timings`."""

    def __init__(self):
        self.started, self.timings = time.perf_counter(), {}

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 3)

    def total(self) -> dict:
        return self.timings | {"total_s": round(time.perf_counter() - self.started, 3)}


@dataclass
class Job:
    """What the phases of one run share, once it is connected and checked."""

    cfg: TrainConfig  # with its output and run name
    source: object  # the data before it is read: data.FashionMNIST or catalog.Catalog
    cluster: Cluster
    plan: TrainPlan
    earlier: dict | None  # the train state of the run this one resumes, if any
    tracker: tracking.Tracker | None
    clock: Stopwatch
    previous: dict | None = None  # --compare: the earlier run's metrics.json


def run(cfg: TrainConfig, extras: dict[str, bytes] | None = None, tracking_parent: str | None = None,
        read: tuple[object, data.TrainingData] | None = None) -> RunResult:
    """The job. `extras`: more files for the outputs ({name: contents}, jobs/tune.py's trials.csv);
    `tracking_parent`: the MLflow run this one is nested in (a search's); `read`: the data's source and its
    training data, already read (a search's, for its final run)."""
    clock = Stopwatch()
    output = cfg.output or str(default_output())
    with storage.staged_output(output, last="metrics.json") as staging:
        job = _begin(dataclasses.replace(cfg, output=output), clock, read[0] if read else None, tracking_parent)
        with tracking.ended_on_failure(job.tracker):
            training = read[1] if read else _read(job)
            from clf import trainer

            trainer.check_same_photos(job.cfg, job.earlier, training.identity)
            _announce(job.cfg, job.cluster, job.plan, training)
            fitted = _train(job, training)
            rows, scores, infer_plan = _evaluate(job, training, fitted)
            with clock.phase("write_s"):
                fitted.checkpoint.to_directory(str(staging / "checkpoint"))
                for name, contents in (extras or {}).items():
                    (staging / name).write_bytes(contents)
                _write(staging, job, infer_plan, training, fitted, rows, scores)
                _track_end(job.tracker, scores, training.classes, staging)
    print(report.ending(scores, training.classes, training.eval_name), flush=True)
    return RunResult(rows["prediction"].tolist(), scores.accuracy, scores.precision, scores.recall,
                     training.classes, output, fitted.history, clock.total())


def _begin(cfg: TrainConfig, clock: Stopwatch, source, tracking_parent: str | None) -> Job:
    """Everything that can refuse the run, before any photo is read or worker started: the data listed (or read),
    the tracking store and the checkpoint storage tried, Ray joined, the plan, the nodes' view of local paths, the
    run this one resumes; then its MLflow run started."""
    with clock.phase("load_data_s"):
        if source is None:
            source = catalog.open_catalog(cfg) if cfg.train_data else data.load(cfg.data_dir, cfg.download)
        if len(getattr(source, "sources", ())) > 1:
            print(catalog.describe_sources(source.sources), flush=True)
        previous = report.read_metrics(cfg.compare, "--compare") if cfg.compare else None
        if uri := tracking.tracking_uri(cfg.tracking_uri):
            tracking.connect(uri)  # the tracking store answers, before any work
        storage.check_writable(storage.checkpoint_storage(cfg.storage_path), "--storage-path")
        placement_tries()  # a CLF_PLACEMENT_TRIES that cannot work, before Ray starts
    with clock.phase("ray_start_s"):
        with session.importing(WHILE_RAY_STARTS):
            session.connect(cfg.ray_logs, cfg.dashboard)
        from clf import trainer  # imported by now

        cfg = dataclasses.replace(cfg, run_name=cfg.run_name or trainer.new_run_name(cfg.output))
        cluster = cluster_nodes()
        train_plan = plan.plan_training(cfg, cluster)
    with clock.phase("check_s"):
        trainer.check_storage_is_shared(cfg, cluster)
        if cfg.train_data:
            source.check_every_node_reads(cluster)
        earlier = trainer.previous_run(cfg)
        print(trainer.resume_notice(cfg, earlier, source.identity), flush=True)
        tracker = _tracker(uri, cfg, earlier, source.identity, tracking_parent) if uri else None
    return Job(cfg, source, cluster, train_plan, earlier, tracker, clock, previous)


def _read(job: Job) -> data.TrainingData:
    """The data read into Ray's object store (a catalog's photos read and converted, once)."""
    photos = bool(job.cfg.train_data)
    with job.clock.phase("read_photos_s" if photos else "prepare_s"):
        training = job.source.prepare(validation=job.cfg.validation)
    if photos:
        print(f"read {training.num_train + len(training.eval_rows) + len(training.skipped):,} photos in "
              f"{job.clock.timings['read_photos_s']:.1f} s", flush=True)
    return training


def _train(job: Job, training: data.TrainingData):
    from clf import trainer

    with job.clock.phase("train_s"):
        fitted = trainer.fit(job.cfg, job.plan, training, listing=job.source.identity, tracker=job.tracker)
    job.clock.timings |= {"train_start_s": fitted.timeline.get("first_step"),
                          "train_end_s": _difference(fitted.timeline, "fit_returned", "last_step")}
    finished_before = job.earlier is not None and job.earlier.get("epoch", 0) >= job.cfg.epochs  # evaluated again only
    if (resumed := fitted.history and fitted.history[-1]["resumed_from_epoch"]) and not finished_before:
        print(f"training resumed from the checkpoint after epoch {resumed}", flush=True)
    return fitted


def _evaluate(job: Job, training: data.TrainingData, fitted) -> tuple[pd.DataFrame, Metrics, InferPlan]:
    """Every evaluation row predicted by the Ray Data predictor, and the metrics torchmetrics reduces them to."""
    from clf import infer, metrics

    with job.clock.phase("inference_s"):
        # After training, from the cluster as it is then: a node may be gone.
        infer_plan = plan.plan_inference(job.cfg, cluster_nodes(), len(training.eval_rows))
        model = ckpt.read(fitted.checkpoint.path, fitted.checkpoint.filesystem)  # wherever Ray Train keeps it
        rows = infer.evaluate(model, training, infer_plan, job.cfg.infer_batch_size)
    return rows, metrics.compute(rows["label"], rows["prediction"], len(training.classes)), infer_plan


def _tracker(uri: str, cfg: TrainConfig, earlier: dict | None, identity: str, parent: str | None) -> tracking.Tracker:
    """The run's MLflow run: the one its checkpoints name when it resumes (a new one, with a warning, if that one
    is gone), else a new one (in `parent`'s)."""
    from clf.report import provenance

    tracker = tracking.Tracker.start(uri, "train.py", cfg.run_name, run_id=(earlier or {}).get("mlflow_run_id"),
                                     tags={"mlflow.parentRunId": parent} if parent else None)
    tracker.params(tracking.training_params(cfg))
    tracker.tags({"clf.run": cfg.run_name, "clf.kind": "training", "clf.data": identity, "clf.output": cfg.output,
                  "mlflow.source.git.commit": provenance()["git_commit"] or "unknown"})
    return tracker


def _track_end(tracker: tracking.Tracker | None, scores: Metrics, classes: list[str], outputs: Path) -> None:
    if tracker:
        tracker.metrics(tracking.final_metrics(scores, classes))
        tracker.artifacts(outputs)
        tracker.end()


def default_output(now: datetime | None = None) -> Path:
    return Path("runs") / (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


def _difference(timeline: dict, later: str, earlier: str) -> float | None:
    return None if timeline.get(earlier) is None else round(timeline[later] - timeline[earlier], 3)


def _announce(cfg: TrainConfig, cluster: Cluster, plan: TrainPlan, training: data.TrainingData) -> None:
    for line in (
        training.skipped and f"skipped {len(training.skipped):,} file(s) that cannot be read "
        f"({report.reasons(s['reason'] for s in training.skipped)}): listed in metrics.json",
        f"training on {training.num_train:,} {training.unit} of {len(training.classes)} classes from {training.source}: "
        f"{plan.describe()}, {cfg.epochs} epoch(s)",
        plan.sized_to_free and f"sized to what is free: the cluster has {cluster.describe()}, {cluster.describe_free()}",
        plan.waits_for_nodes and f"waiting for the autoscaler to add nodes: {cluster.describe()} are up, too few "
        f"for {plan.describe()} (at least {plan.min_workers}); Ray Train tries to place them for about "
        f"{placement_tries()} minutes",
    ):
        if line:
            print(line, flush=True)


def _write(folder: Path, job: Job, infer_plan: InferPlan, training: data.TrainingData, fitted, rows: pd.DataFrame,
           scores: Metrics) -> None:
    """predictions.parquet, the run report, and metrics.json last."""
    from clf import infer

    cfg, history = job.cfg, fitted.history
    provenance = report.provenance()
    report.write_predictions(folder / "predictions.parquet", rows)
    facts = {
        "run": cfg.run_name, "epochs": cfg.epochs, "workers": job.plan.describe(), "data": training.source,
        "finished": datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": provenance["git_commit"] or "unknown",
    }
    compared = job.previous and {"location": cfg.compare, "run": job.previous.get("config", {}).get("run_name"),
                                 "accuracy": job.previous["accuracy"]}
    if compared:
        facts["compared with"] = f"{compared['run'] or compared['location']} (accuracy {compared['accuracy']:.4f})"
    mistakes = _confident_mistakes(rows, training)
    report.write_run_report(folder, scores, training.classes, history, mistakes, facts, training.eval_name,
                            previous=job.previous)
    report.write_metrics(folder / "metrics.json", scores, training.classes, {
        "config": dataclasses.asdict(cfg),
        "plan": {"training": dataclasses.asdict(job.plan), "inference": dataclasses.asdict(infer_plan)},
        # Ray node ids: each training worker's, by rank, in the last epoch; each inference actor's.
        "placement": {
            "training_workers": history[-1].get("nodes", []) if history else [],
            "inference_actors": infer.placement(rows),
        },
        "data_source": training.source,
        "data_identity": training.identity,
        # A catalog's --train-data sources, each with its rows and what it changed; each photo a later one relabelled.
        "sources": getattr(job.source, "sources", []),
        "relabelled": getattr(job.source, "relabelled", []),
        "compared_with": compared or None,
        "skipped_files": training.skipped,
        "history": history,
        "timings": job.clock.total(),
        # Seconds from fit() called to each moment of training's rank 0 (its last attempt) and fit()'s return.
        "training_timeline": fitted.timeline,
        "provenance": provenance,
    })


def _confident_mistakes(rows: pd.DataFrame, training: data.TrainingData, count: int = 24) -> dict:
    wrong = rows[rows["prediction"] != rows["label"]].sort_values("confidence", ascending=False).head(count)
    ids = wrong["id"].to_numpy()
    return {
        "images": training.images_of(ids),
        "id": ids,
        "label": wrong["label"].to_numpy(),
        "prediction": wrong["prediction"].to_numpy(),
        "confidence": wrong["confidence"].to_numpy(),
    }
