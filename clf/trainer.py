"""fit(): the TorchTrainer around `clf.train`'s loop, the guard that resumes a run only with its own
settings, and the history of every epoch.

Data: one way, whatever the source. The training set is a Ray Dataset of decoded rows (id, label, 28x28
image) in a fixed order; Ray Train splits it equally between the ranks (`get_dataset_shard`), in order
(Ray Data's `preserve_order`, which also makes its split deterministic), and each rank takes its shard
into memory once (`take_shard`: 784 bytes an image) and batches it every epoch from there. Same data,
seed and worker count: the same shards, the same batches, the same metrics. Each epoch every rank calls `ray.train.report`
(a barrier) and rank 0 attaches a checkpoint whose train state holds the history of every epoch so far:
Ray Train keeps only the latest checkpoints (and their metrics), the history is whole in each one.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
import ray.exceptions
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from clf import checkpoint as ckpt
from clf import console, runtime, storage
from clf.config import TrainConfig
from clf.data import TrainingData
from clf.errors import ClfError, ConfigError
from clf.runtime import TrainPlan
from clf.train import Learner, array_batches, make_learner, new_model, steps_per_epoch, train_epochs

# The settings a run must keep to be resumed: with other ones, its checkpoint is from another experiment.
RESUME_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "seed")


@dataclass(frozen=True)
class Fitted:
    checkpoint: ray.train.Checkpoint  # the final model
    history: list[dict]  # one record per epoch of the whole run, resumed attempts included


# --- On each worker --------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = TrainConfig(**loop_config["config"])
    # Ray starts workers with OMP_NUM_THREADS=1; give torch the CPUs this worker reserved.
    torch.set_num_threads(loop_config["threads"])
    ctx = ray.train.get_context()
    rank, world_size, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    classes, num_train = loop_config["classes"], loop_config["num_train"]
    board = loop_config["progress"]
    images, labels = take_shard(ray.train.get_dataset_shard("train"))

    model, state = new_model(cfg, len(classes)), None
    resume_from = ray.train.get_checkpoint()
    if resume_from is not None:
        with resume_from.as_directory() as folder:
            model, _ = ckpt.load_model(folder)
            state = ckpt.load_train_state(folder)
        if rank == 0:
            board.note.remote(f"resumed from the checkpoint after epoch {state['epoch']}")
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world_size > 1
    learner = make_learner(cfg, model, num_train, state)
    start_epoch = state["epoch"] if state else 0
    history = list(state["history"]) if state else []
    nodes = _node_of_each_rank()

    def report(record: dict) -> None:
        # 0: this attempt started from scratch; fewer workers than asked after a lost node, if elastic.
        record |= {"resumed_from_epoch": start_epoch, "workers": world_size, "nodes": nodes}
        history.append(record)
        _report(record, learner, history, rank, cfg, classes, loop_config["identity"])
        if rank == 0:
            board.epoch_done.remote(record)

    train_epochs(learner, lambda epoch: array_batches(images, labels, epoch, cfg, num_train), cfg,
                 start_epoch=start_epoch, rank=rank, device=device, reduce=_all_reduce, after_epoch=report,
                 after_step=_StepsSent(board, steps_per_epoch(num_train, cfg.batch_size)) if rank == 0 else None)


def take_shard(shard) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows of the training Dataset, in id order: (images (N, 28, 28) uint8, labels (N,) int64).
    Read once: the epochs batch them from memory (a streamed shard would cost Ray Data's per-batch work in
    every step), and the id order makes the batches independent of how the blocks arrived."""
    ids, images, labels = [], [], []
    for block in shard.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(block["id"])
        images.append(block["image"])
        labels.append(block["label"])
    order = np.argsort(np.concatenate(ids), kind="stable")
    return np.concatenate(images)[order], np.concatenate(labels)[order].astype(np.int64)


def _node_of_each_rank() -> list[str]:
    """The Ray node id each rank runs on, in rank order (the same list on every rank)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [node]
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _all_reduce(totals: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, so the figures reported are for all the data, not rank 0's shard."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.cpu()


def _report(record: dict, learner: Learner, history: list[dict], rank: int, cfg: TrainConfig, classes: list[str],
            identity: dict) -> None:
    """Every rank reports (it is a barrier); rank 0 alone writes the checkpoint, as the weights agree."""
    if rank != 0:
        ray.train.report(record)
        return
    with tempfile.TemporaryDirectory(prefix="clf-ckpt-") as folder:
        train_state = {
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "epoch": record["epoch"],  # epochs completed
            "settings": run_settings(cfg, identity),
            "history": history,
        }
        ckpt.save(folder, learner.model, classes, train_state)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder))


@ray.remote(num_cpus=0, max_restarts=0)
class EpochProgress:
    """Where rank 0 leaves how far its epoch is, each epoch's record and its notes, for the driver to print:
    the driver prints every line of the job (Ray's forwarding of worker output is off by default, and
    would prefix each line with the worker's name)."""

    def __init__(self):
        self.step, self.records, self.notes = (0, 0, 0), [], []

    def at(self, epoch: int, steps: int, total: int) -> None:
        self.step = (epoch, steps, total)

    def epoch_done(self, record: dict) -> None:
        self.records.append(record)

    def note(self, line: str) -> None:
        self.notes.append(line)

    def read(self, records_seen: int, notes_seen: int) -> tuple[tuple[int, int, int], list[dict], list[str]]:
        return self.step, self.records[records_seen:], self.notes[notes_seen:]


class _StepsSent:
    """Rank 0's steps to the board, at most twice a second (a call that does not wait, ~0.1 ms)."""

    def __init__(self, board, steps: int, every_s: float = 0.5):
        self.board, self.steps, self.every_s, self.last = board, steps, every_s, 0.0

    def __call__(self, epoch: int, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.board.at.remote(epoch, done, self.steps)


def _show_progress(board, cfg: TrainConfig, num_train: int, unit: str, stop: threading.Event) -> None:
    """The driver's side, in a thread while fit() runs: a progress line for the epoch under way, and one
    line for each epoch done."""
    progress, shown, finished, seen = None, -1, 0, (0, 0)
    while True:
        stopping = stop.wait(0.5)  # once set: the last records, then done
        try:
            (epoch, steps, total), records, notes = ray.get(board.read.remote(*seen), timeout=10)
        except ray.exceptions.RayError:  # GetTimeoutError included: progress is not worth a failure
            break
        seen = (seen[0] + len(records), seen[1] + len(notes))
        for line in notes:
            (progress.write if progress is not None else _print)(line)
        for record in records:
            if progress is not None and record["epoch"] == shown + 1:
                progress.close()
                progress = None
            finished = max(finished, record["epoch"])
            _print(epoch_line(record, cfg.epochs, unit))
        if stopping:
            break
        if total and epoch + 1 > finished:  # (0-based) epoch `epoch` under way
            if shown != epoch:
                if progress is not None:
                    progress.close()
                progress, shown = console.Progress(f"epoch {epoch + 1}/{cfg.epochs}", num_train, unit), epoch
            progress.update(min(num_train, num_train * steps // total) - progress.done)
    if progress is not None:
        progress.close()


def epoch_line(record: dict, epochs: int, unit: str = "images") -> str:
    return (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, train accuracy {record['accuracy']:.4f}, "
            f"{record['images_per_s']:,.0f} {unit}/s, {record['elapsed_s']:.1f} s")


def _print(line: str) -> None:
    print(line, flush=True)


# --- On the driver ---------------------------------------------------------------------------------------


def run_settings(cfg: TrainConfig, identity: dict) -> dict:
    """What a resumed run must share with the run it resumes: the settings, and the data's identity (the
    listing's, checked before any photo is read, and the photos actually used, checked once read)."""
    return {name: getattr(cfg, name) for name in RESUME_SETTINGS} | identity


def run_folder(cfg: TrainConfig) -> str:
    return f"{runtime.storage_uri(cfg.storage_path).rstrip('/')}/{cfg.run_name}"


def check_storage_is_shared(cfg: TrainConfig, cluster: runtime.Cluster) -> None:
    """On several nodes, a local --storage-path works only if it is the same shared folder (NFS) on every
    node: the workers write checkpoints there and the driver and a restarted run read them. A task on each
    node looks for a marker the driver writes there."""
    uri = runtime.storage_uri(cfg.storage_path)
    if len(cluster.nodes) < 2 or not storage.Place.of(uri).local:
        return
    marker = storage.write_marker(uri, "--storage-path")
    try:
        runtime.refuse_unseen(cluster, [storage.Place.of(marker).path], f"--storage-path {uri}")
    finally:
        storage.remove(marker)


def previous_run(cfg: TrainConfig) -> dict | None:
    """The train state of the latest checkpoint of an earlier run of this name in the storage, if any."""
    try:
        earlier = Result.from_path(run_folder(cfg))
    except RuntimeError:  # no such run folder, or no checkpoint registered in it
        return None
    if earlier.checkpoint is None:
        return None
    with earlier.checkpoint.as_directory() as folder:
        return ckpt.load_train_state(folder)


def resume_notice(cfg: TrainConfig, earlier: dict | None, listing: str) -> str:
    """What becomes of this run name: a new run, or the resumption of `earlier`, the run of the same name in
    the storage (refused, with ConfigError, when that one was started with other settings or files)."""
    if earlier is None:
        return (f"run {cfg.run_name}: checkpoints in {run_folder(cfg)} "
                f"(if this run is interrupted, start it again with --run-name {cfg.run_name} to resume it)")
    before = earlier.get("settings", {})
    changed = [f"{name} {before.get(name)!r} -> {getattr(cfg, name)!r}" for name in RESUME_SETTINGS
               if before.get(name) != getattr(cfg, name)]
    if changed:
        raise ConfigError(
            f"run {cfg.run_name!r} in {runtime.storage_uri(cfg.storage_path)} was started with other settings "
            f"({', '.join(changed)}); resume it with its own settings or choose a new --run-name"
        )
    if before.get("listing", listing) != listing:  # checkpoints from before it was recorded: not refused
        raise ConfigError(
            f"run {cfg.run_name!r} in {runtime.storage_uri(cfg.storage_path)} was started on other data (its files, "
            f"their labels or sizes changed: {before['listing']} -> {listing}); resume it with its own files or "
            "choose a new --run-name"
        )
    if earlier["epoch"] >= cfg.epochs:
        return f"run {cfg.run_name} had finished its {cfg.epochs} epoch(s): evaluating its final model"
    return f"run {cfg.run_name} has a checkpoint after epoch {earlier['epoch']}: resuming from it"


def check_same_photos(cfg: TrainConfig, earlier: dict | None, photos: str) -> None:
    """Once the photos are read: a resumed run must train on the photos its first attempt used. The same
    listing can give others when a photo read then cannot be read now (or the other way round)."""
    before = (earlier or {}).get("settings", {}).get("photos", photos)
    if before != photos:
        raise ConfigError(
            f"run {cfg.run_name!r} in {runtime.storage_uri(cfg.storage_path)} was trained on other photos than "
            f"the ones read now ({before} -> {photos}): a photo it used cannot be read now, or one it skipped can, "
            "or a file changed; resume it when they read as before, or choose a new --run-name"
        )


def fit(cfg: TrainConfig, plan: TrainPlan, data: TrainingData, listing: str | None = None) -> Fitted:
    """Train with a TorchTrainer on the connected Ray cluster, as `plan` says. `listing`: the identity of the
    listing the data was read from (default: the data's own), kept in each checkpoint for a resume."""
    runtime.prepare_fit()
    # On the driver's node, which lives as long as the run: a worker node may be lost.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    board, stop = EpochProgress.options(scheduling_strategy=here).remote(), threading.Event()
    shower = threading.Thread(target=_show_progress, args=(board, cfg, data.num_train, data.unit, stop), daemon=True)
    shower.start()
    with runtime.ctrl_c_kept():
        try:
            result = _trainer(cfg, plan, data, listing or data.identity, board).fit()
        except Exception as e:
            failure = runtime.training_failure(e)
            if failure is e:
                raise  # a bug of ours: its traceback, and the worker's in Ray's message
            raise failure from None
        finally:
            stop.set()
            shower.join()
            ray.kill(board)
    if result.checkpoint is None:
        raise ClfError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        history = ckpt.load_train_state(folder).get("history", [])  # none in older checkpoints
    return Fitted(result.checkpoint, history)


def in_order_ingest() -> ExecutionOptions:
    """Ray Train's ingest options, with the rows kept in the Dataset's order: its equal split then deals
    the same rows to the same ranks every run (Ray Data 2.60 drops the locality hints that would make it
    depend on timing). The cost is locality: a shard's blocks may come from another node, once per run.
    (Made here, not from `DataConfig.default_ingest_options()`, which passes Ray Data a deprecated option
    and warns in every run.)"""
    current = ray.data.DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                            verbose_progress=current.verbose_progress)


def _trainer(cfg: TrainConfig, plan: TrainPlan, data: TrainingData, listing: str, board) -> TorchTrainer:
    loop_config = {
        "progress": board,
        "config": dataclasses.asdict(cfg),
        "threads": plan.cpus_per_worker,
        "classes": data.classes,
        "num_train": data.num_train,
        "identity": {"listing": listing, "photos": data.identity},
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets={"train": data.train},  # Ray Train gives each rank an equal shard
        dataset_config=DataConfig(execution_options=in_order_ingest()),
        scaling_config=ScalingConfig(
            # Elastic: start with what can be placed, down to min_workers; after a lost node, wait for a
            # replacement only as long as RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), then go on with
            # the workers that fit.
            num_workers=(plan.min_workers, plan.num_workers) if plan.elastic else plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
            placement_strategy=plan.placement,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=runtime.storage_uri(cfg.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=runtime.PLACEMENT_WAITS
            ),
            logging_config=LoggingConfig(log_level="WARNING"),  # not a line per report
        ),
    )
