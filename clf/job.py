"""The training job end to end: data, Ray, training, test-set tagging, metrics, outputs.

`run()` is what `jobs/train.py` calls and what Python users call. Outputs are written into a hidden
folder beside `--output` and renamed into place only when all of them are written, so a folder named
like a run is always a complete run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from clf import data, metrics as metrics_lib, report
from clf.config import ClfError, ConfigError, TrainConfig, first_line


@dataclass(frozen=True)
class RunResult:
    predictions: list[int]  # predicted class of each test image, in test-set order
    accuracy: float
    precision: list[float]  # per class, class-index order
    recall: list[float]
    classes: list[str]
    output: Path
    history: list[dict] = field(default_factory=list)  # the metrics reported after each epoch
    timings: dict = field(default_factory=dict)  # seconds per phase


def default_output(now: datetime | None = None) -> Path:
    return Path("runs") / (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


@contextmanager
def staged_output(output: Path):
    """The temporary folder to fill in place of `output`: renamed to `output` when the block ends, removed
    when it raises (Ctrl-C included), so a folder named `output` is always complete."""
    staging = prepare_output(output)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(output)


def prepare_output(output: Path) -> Path:
    """Refuse an existing output; return the temporary folder to fill, beside it on the same disk."""
    if output.exists():
        raise ConfigError(f"--output {output} exists already; choose a new folder (runs are never overwritten)")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as e:
        raise ConfigError(f"--output {output} cannot be written ({e.strerror or e})") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the run folder gets the usual mode
    return staging


# An embedded Ray listens on loopback only, dashboard included (it serves the state API that Ray
# Train's clean-up relies on). Ray swaps 127.0.0.1 for the machine's outward address unless it runs in
# its single-machine mode (the one it uses on macOS and Windows), which this variable selects; it must
# be set before `ray` is imported, and the processes Ray starts inherit it.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOCAL_RAY = dict(
    address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1"
)


def connect_ray():
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start an embedded local Ray."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local" even when a `ray start` cluster runs on this machine: joining one is asked for
            # explicitly, with RAY_ADDRESS.
            ray.init(**LOCAL_RAY)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ClfError(f"could not start or join {where}: {first_line(e)}") from None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nobody answers at: ray.init would retry for many minutes."""
    import socket

    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClfError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e.strerror or e})") from None


def cluster_cpus_gpus() -> tuple[int, int]:
    """Whole CPUs and GPUs of the connected Ray cluster."""
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 0)), int(resources.get("GPU", 0))


def resolve_training(cfg: TrainConfig) -> TrainConfig:
    """Fill the training settings left to the cluster (workers, CPUs each) from its resources."""
    cpus, gpus = cluster_cpus_gpus()
    if cfg.use_gpu:
        if gpus < 1:
            raise ConfigError(
                "--use-gpu was given but the Ray cluster has no GPU (on an autoscaling cluster keep at "
                "least one GPU node up)"
            )
        num_workers = cfg.num_workers or gpus
        needed = min(num_workers, cfg.min_workers or num_workers)  # an elastic run starts with its minimum
        if needed > gpus:
            raise ConfigError(f"--num-workers {needed} with --use-gpu needs {needed} GPUs; the cluster has {gpus}")
        # The GPU does the arithmetic; a thread or two keeps it fed from the in-memory shard.
        cpus_per_worker = cfg.cpus_per_worker or 1
    else:
        num_workers = cfg.num_workers or 1
        cpus_per_worker = cfg.cpus_per_worker or max(1, cpus // num_workers)
        needed = min(num_workers, cfg.min_workers or num_workers)
        if needed * cpus_per_worker > cpus:
            raise ConfigError(
                f"{needed} workers x {cpus_per_worker} CPUs need {needed * cpus_per_worker} CPUs; "
                f"the cluster has {cpus}"
            )
    if cfg.min_workers is not None and cfg.min_workers > num_workers:
        raise ConfigError(f"--min-workers {cfg.min_workers} is more than the {num_workers} workers of the run")
    return cfg.replace(num_workers=num_workers, cpus_per_worker=cpus_per_worker)


def resolve_inference(cfg: TrainConfig) -> TrainConfig:
    """Fill the inference actor count from the cluster as it is now (after training: a node may be gone)."""
    if cfg.num_infer_actors:
        return cfg
    cpus, gpus = cluster_cpus_gpus()
    if cfg.use_gpu:
        return cfg.replace(num_infer_actors=max(1, gpus))
    # One single-threaded actor per CPU: faster than fewer multi-threaded ones for a model this small.
    # The test set is already in memory, so no task upstream needs a CPU of its own (a pipeline that
    # reads or shuffles must leave it one, or the actors starve it).
    return cfg.replace(num_infer_actors=max(1, cpus))


def evaluate(result_checkpoint, test: data.Split, cfg: TrainConfig, shuffle: bool = False) -> pd.DataFrame:
    """Tag every test image with the Ray Data predictor; rows (id, label, prediction, confidence) in id order.

    `shuffle` (for tests) reorders the rows first; the shuffle's tasks need a CPU that the actors leave free.
    """
    from clf.infer import predict

    dataset = data.to_ray_dataset(test)
    if shuffle:
        dataset = dataset.random_shuffle(seed=cfg.seed)
    tagged = predict(
        dataset,
        result_checkpoint,
        batch_size=cfg.infer_batch_size,
        num_actors=cfg.num_infer_actors,
        use_gpu=cfg.use_gpu,
        cpus_per_actor=0 if cfg.use_gpu else 1,
    )
    rows = tagged.to_pandas().sort_values("id", ignore_index=True)
    # Every test image exactly once, each with the label it was read with: never a partial result.
    if len(rows) != len(test.labels) or not np.array_equal(rows["id"].to_numpy(), np.arange(len(test.labels))):
        raise ClfError(f"inference returned {len(rows)} rows for {len(test.labels)} test images")
    if not np.array_equal(rows["label"].to_numpy(), test.labels):
        raise ClfError("inference returned labels that differ from the test set's")
    return rows


def run(cfg: TrainConfig) -> RunResult:
    started = time.perf_counter()
    timings = {}
    output = Path(cfg.output) if cfg.output else default_output()
    with staged_output(output) as staging:
        return _run(cfg, output, staging, timings, started)


def _run(cfg: TrainConfig, output: Path, staging: Path, timings: dict, started: float) -> RunResult:

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    if cfg.run_name is None:
        cfg = cfg.replace(run_name=f"{output.name}-{secrets.token_hex(3)}")  # never an earlier run's
    t = time.perf_counter()
    dataset = data.load(cfg.data_dir, cfg.download)
    t = lap("load_data_s", t)
    connect_ray()  # before anything imports ray: see LOOPBACK_ENV
    import ray.data

    from clf.train import check_resumable, fit, previous_run, run_folder

    # Ray Data's progress bars are for terminals; in a log they are thousands of lines.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    cfg = resolve_training(cfg)
    t = lap("ray_start_s", t)
    earlier = previous_run(cfg)
    if earlier is not None:
        check_resumable(earlier, cfg)
        if earlier["epoch"] >= cfg.epochs:
            print(f"run {cfg.run_name} had finished its {cfg.epochs} epoch(s): evaluating its final model", flush=True)
        else:
            print(f"run {cfg.run_name} has a checkpoint after epoch {earlier['epoch']}: resuming from it", flush=True)
    else:
        print(
            f"run {cfg.run_name}: checkpoints in {run_folder(cfg)} "
            f"(if this run is interrupted, start it again with --run-name {cfg.run_name} to resume it)",
            flush=True,
        )
    print(
        f"training on {len(dataset.train.labels):,} images from {dataset.source}: {cfg.num_workers} "
        f"worker(s) x {cfg.cpus_per_worker} CPU{' + 1 GPU' if cfg.use_gpu else ''}, {cfg.epochs} epoch(s)",
        flush=True,
    )
    result = fit(cfg, dataset.train)
    t = lap("train_s", t)
    if result.metrics.get("resumed_from_epoch"):
        print(f"training resumed from the checkpoint after epoch {result.metrics['resumed_from_epoch']}", flush=True)
    cfg = resolve_inference(cfg)
    rows = evaluate(result.checkpoint, dataset.test, cfg)
    t = lap("inference_s", t)
    scores = metrics_lib.compute(rows["label"], rows["prediction"], len(data.CLASSES))

    result.checkpoint.to_directory(str(staging / "checkpoint"))
    report.write_predictions(staging / "predictions.parquet", rows)
    history = _history(result)
    provenance = report.provenance()
    report.write_run_report(
        staging,
        scores,
        data.CLASSES,
        history,
        _confident_mistakes(rows, dataset.test),
        {
            "run": cfg.run_name,
            "epochs": cfg.epochs,
            "workers": f"{cfg.num_workers} x {cfg.cpus_per_worker} CPU" + (" + 1 GPU" if cfg.use_gpu else ""),
            "data": dataset.source,
            "finished": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "commit": provenance["git_commit"] or "unknown",
        },
    )
    lap("write_s", t)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    report.write_metrics(
        staging / "metrics.json",
        scores,
        data.CLASSES,
        {
            "config": cfg.to_dict(),
            "data_source": dataset.source,
            "history": history,
            "timings": timings,
            "provenance": provenance,
        },
    )
    if history:
        print(report.history_table(history), flush=True)
    print(report.table(scores, data.CLASSES), flush=True)
    return RunResult(
        predictions=rows["prediction"].tolist(),
        accuracy=scores.accuracy,
        precision=scores.precision,
        recall=scores.recall,
        classes=list(data.CLASSES),
        output=output,
        history=history,
        timings=timings,
    )


def _confident_mistakes(rows: pd.DataFrame, test: data.Split, count: int = 24) -> dict:
    wrong = rows[rows["prediction"] != rows["label"]].sort_values("confidence", ascending=False).head(count)
    ids = wrong["id"].to_numpy()
    return {
        "images": test.images[ids],
        "id": ids,
        "label": wrong["label"].to_numpy(),
        "prediction": wrong["prediction"].to_numpy(),
        "confidence": wrong["confidence"].to_numpy(),
    }


def _history(result) -> list[dict]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return [dict(result.metrics)]
    keep = ["epoch", "loss", "accuracy", "images_per_s", "elapsed_s", "resumed_from_epoch", "workers"]
    if "epoch" not in frame.columns:  # a finished run started again: nothing was trained this time
        return []
    frame = frame.dropna(subset=["epoch"])
    return frame[[k for k in keep if k in frame.columns]].to_dict(orient="records")
