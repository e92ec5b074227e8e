"""fit(): the TorchTrainer around `clf.loop`'s loop, the guard that resumes a run only with its own
settings, and the history of every epoch.

Data: one way, whatever the source. The training rows are blocks in Ray's object store (`clf.data.Blocks`),
in a fixed order; each rank fetches its own part of them into memory once (784 bytes an image) and batches
it every epoch from there. No process coordinates the dealing: every rank cuts the same row counts the same
way. Same data, seed and worker count: the same parts, the same batches, the same metrics. Each epoch every
rank calls `ray.train.report` (a barrier) and rank 0 attaches a checkpoint whose train state holds the
history of every epoch so far: Ray Train keeps only the latest checkpoints (and their metrics), the history
is whole in each one. Rank 0 also posts its progress on the run's noticeboard, which the driver shows
(`clf.progress`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import secrets
import tempfile
import time
from dataclasses import dataclass

import psutil
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig

from clf import checkpoint as ckpt
from clf import failures, ray_train, session, storage
from clf.cluster import refuse_unseen
from clf.config import TrainConfig
from clf.data import TrainingData, TrainingRows
from clf.errors import ClfError, ConfigError, Interrupted
from clf.plan import Cluster, TrainPlan, placement_tries
from clf.loop import Learner, array_batches, make_learner, new_model, steps_per_epoch, train_epochs
from clf.progress import ProgressDisplay, ProgressPost

# The settings a run must keep to be resumed: with other ones, its checkpoint is from another experiment.
RESUME_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "width", "validation", "seed")


@dataclass(frozen=True)
class Fitted:
    checkpoint: ray.train.Checkpoint  # the final model
    history: list[dict]  # one record per epoch of the whole run, resumed attempts included
    timeline: dict  # seconds from fit() called to each moment of the last attempt (see `fit`)


# --- On each worker --------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    entered = time.time()
    cfg = TrainConfig(**loop_config["config"])
    session.use_cpus(loop_config["threads"])
    ctx = ray.train.get_context()
    rank, world_size, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    classes, num_train = loop_config["classes"], loop_config["num_train"]
    board = ProgressPost(loop_config["board"]) if rank == 0 and loop_config["board"] else None
    images, labels = loop_config["train_blocks"].take(rank, world_size)
    validation = loop_config["validation_blocks"]
    held_out = validation.take(rank, world_size) if validation else None
    # When this attempt's worker started, entered the loop and held its part (rank 0's; unix seconds).
    started = {"process": psutil.Process().create_time(), "train_fn": entered, "shard_in_memory": time.time()}

    model, state = new_model(cfg, len(classes)), None
    resume_from = ray.train.get_checkpoint()
    if resume_from is not None:
        with resume_from.as_directory() as folder:
            model, _ = ckpt.load_model(folder)
            state = ckpt.load_train_state(folder)
        if board:
            board.note(f"resumed from the checkpoint after epoch {state['epoch']}")
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world_size > 1
    learner = make_learner(cfg, model, num_train, state)
    start_epoch = state["epoch"] if state else 0
    history = list(state["history"]) if state else []
    nodes, rows = _each_rank(ray.get_runtime_context().get_node_id()), _each_rank(len(labels))
    steps = steps_per_epoch(num_train, cfg.batch_size)

    last_step = [0.0]

    def after_step(epoch: int, done: int) -> None:
        last_step[0] = time.time()
        started.setdefault("first_step", last_step[0])
        if board:
            board.step(epoch, done, steps)

    def report(record: dict) -> None:
        # 0: this attempt started from scratch; fewer workers than asked after a lost node, if elastic.
        record |= {"resumed_from_epoch": start_epoch, "workers": world_size, "nodes": nodes, "rows": rows,
                   # Each rank's weights, digested: DDP keeps them equal, and rank 0's checkpoint stands for all.
                   "weights": _each_rank(weights_digest(learner.model)), "started": dict(started)}
        history.append(record)
        _report(record, learner, history, rank, cfg, classes, loop_config["identity"], loop_config["mlflow_run_id"])
        if board:
            board.epoch_done(record, last_step=last_step[0], reported=time.time())

    train_epochs(learner, lambda epoch: array_batches(images, labels, epoch, cfg, num_train), cfg,
                 start_epoch=start_epoch, rank=rank, device=device, reduce=_all_reduce, after_epoch=report,
                 after_step=after_step, validation=held_out)


def _each_rank(value) -> list:
    """`value` of every rank, in rank order (the same list on every rank; a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's trainable weights (not BatchNorm's running statistics, which each rank keeps
    from its own batches)."""
    digest = hashlib.sha256()
    for name, weights in sorted(getattr(model, "module", model).named_parameters()):  # DDP's wrapper unwrapped
        digest.update(name.encode())
        digest.update(weights.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _all_reduce(totals: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, so the figures reported are for all the data, not rank 0's shard."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.cpu()


def _report(record: dict, learner: Learner, history: list[dict], rank: int, cfg: TrainConfig, classes: list[str],
            identity: dict, mlflow_run_id: str | None) -> None:
    """Every rank reports (it is a barrier); rank 0 alone writes the checkpoint, as the weights agree."""
    if rank != 0:
        ray.train.report(record)
        return
    with tempfile.TemporaryDirectory(prefix="clf-ckpt-") as folder:
        train_state = {
            "mlflow_run_id": mlflow_run_id,
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "epoch": record["epoch"],  # epochs completed
            "settings": run_settings(cfg, identity),
            "history": history,
        }
        ckpt.save(folder, learner.model, classes, train_state, run=cfg.run_name, mlflow_run_id=mlflow_run_id)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder))


# --- On the driver ---------------------------------------------------------------------------------------


def run_settings(cfg: TrainConfig, identity: dict) -> dict:
    """What a resumed run must share with the run it resumes: the settings, and the data's identity (the
    listing's, checked before any photo is read, and the photos actually used, checked once read)."""
    return {name: getattr(cfg, name) for name in RESUME_SETTINGS} | identity


def new_run_name(output: str) -> str:
    """A run name never used before: a new run must never resume an earlier one by accident."""
    return f"{posixpath.basename(output.rstrip('/')) or 'run'}-{secrets.token_hex(3)}"


def run_folder(cfg: TrainConfig) -> str:
    return f"{storage.checkpoint_storage(cfg.storage_path).rstrip('/')}/{cfg.run_name}"


def check_storage_is_shared(cfg: TrainConfig, cluster: Cluster) -> None:
    """On several nodes, a local --storage-path works only if it is the same shared folder (NFS) on every
    node: the workers write checkpoints there and the driver and a restarted run read them. A task on each
    node looks for a marker the driver writes there."""
    uri = storage.checkpoint_storage(cfg.storage_path)
    if len(cluster.nodes) < 2 or not storage.Place.of(uri).local:
        return
    marker = storage.write_marker(uri, "--storage-path")
    try:
        refuse_unseen(cluster, [storage.Place.of(marker).path], f"--storage-path {uri}")
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
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    before = {name: defaults[name] for name in RESUME_SETTINGS} | earlier.get("settings", {})  # older checkpoints
    changed = [f"{name} {before.get(name)!r} -> {getattr(cfg, name)!r}" for name in RESUME_SETTINGS
               if before.get(name) != getattr(cfg, name)]
    if changed:
        raise ConfigError(
            f"run {cfg.run_name!r} in {storage.checkpoint_storage(cfg.storage_path)} was started with other settings "
            f"({', '.join(changed)}); resume it with its own settings or choose a new --run-name"
        )
    if before.get("listing", listing) != listing:  # checkpoints from before it was recorded: not refused
        raise ConfigError(
            f"run {cfg.run_name!r} in {storage.checkpoint_storage(cfg.storage_path)} was started on other data (its files, "
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
            f"run {cfg.run_name!r} in {storage.checkpoint_storage(cfg.storage_path)} was trained on other photos than "
            f"the ones read now ({before} -> {photos}): a photo it used cannot be read now, or one it skipped can, "
            "or a file changed; resume it when they read as before, or choose a new --run-name"
        )


def fit(cfg: TrainConfig, plan: TrainPlan, data: TrainingData, listing: str | None = None, tracker=None) -> Fitted:
    """Train with a TorchTrainer on the connected Ray cluster, as `plan` says. `listing`: the identity of the
    listing the data was read from (default: the data's own), kept in each checkpoint for a resume. `tracker`:
    the run's MLflow run (clf.tracking), which gets each epoch's record as it is reported, and whose id every
    checkpoint keeps.

    Ctrl-C raises `Interrupted`, saying which checkpoint is kept and how to resume. The timeline:
    when fit() was called (unix seconds), then seconds from it to when rank 0 of the last attempt started its
    process, entered the training function, held its part of the data, took its first and last steps, and
    had its last report returned, and to when fit() returned."""
    called = time.time()
    board_key = f"{cfg.run_name}-{secrets.token_hex(4)}"
    display = ProgressDisplay(board_key, cfg.epochs, data.num_train, data.unit,
                              tracker.epoch if tracker else None).start()
    with ray_train.ctrl_c_kept():
        try:
            result = _trainer(cfg, plan, data.rows, listing or data.identity, board_key,
                              tracker.run_id if tracker else None).fit()
        except KeyboardInterrupt:
            raise Interrupted(interrupted(cfg)) from None
        except Exception as e:
            failure = failures.training_failure(e, placed_before=display.trained, asked=plan.describe())
            if failure is e:
                raise  # a bug of ours: its traceback, and the worker's in Ray's message
            raise failure from None
        finally:
            display.stop()
    returned = time.time()
    if result.checkpoint is None:
        raise ClfError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        history = ckpt.load_train_state(folder).get("history", [])  # none in older checkpoints
    return Fitted(result.checkpoint, history, timeline(called, returned, history, display.state))


def timeline(called: float, returned: float, history: list[dict], board: dict) -> dict:
    """Seconds from fit() called to each moment of rank 0's last attempt (see `fit`); None where unknown
    (a run that resumed a finished run takes no step)."""
    moments = dict(history[-1].get("started", {})) if history and board.get("records") else {}
    moments |= {"last_step": board.get("last_step"), "last_report_returned": board.get("reported")}
    seconds = {name: round(at - called, 3) if at else None for name, at in moments.items()}
    return {"fit_called_at": called} | seconds | {"fit_returned": round(returned - called, 3)}


def interrupted(cfg: TrainConfig) -> str:
    """What a Ctrl-C during training leaves: the checkpoint after the last epoch Ray Train registered, or
    none, and how to resume."""
    try:
        kept = previous_run(cfg)
    except (ClfError, OSError, KeyboardInterrupt):
        kept = None
    if kept is None:
        return f"interrupted during the first epoch of run {cfg.run_name}: no checkpoint was kept; nothing to resume"
    return (f"interrupted: run {cfg.run_name} keeps its checkpoint after epoch {kept['epoch']} in {run_folder(cfg)}; "
            f"start it again with --run-name {cfg.run_name} (and the same settings) to resume it")


def _trainer(cfg: TrainConfig, plan: TrainPlan, rows: TrainingRows, listing: str, board: str | None,
             mlflow_run_id: str | None, callbacks: list | None = None, in_tune: bool = False):
    """The TorchTrainer of a run: `board`, the key of the noticeboard rank 0 posts on (None: none);
    `callbacks`, Ray Train's (a Tune trial's TuneReportCallback); `in_tune`: a Tune trial's run, whose workers'
    placement group is noted for the search's driver (`clf.ray_train.PostPlacementGroup`)."""
    loop_config = {
        "mlflow_run_id": mlflow_run_id,
        "board": board,
        "train_blocks": rows.train,  # references: each rank fetches its own part
        "validation_blocks": rows.validation,
        "config": dataclasses.asdict(cfg),
        "threads": plan.cpus_per_worker,
        "classes": rows.classes,
        "num_train": rows.train.num_rows,
        "identity": {"listing": listing, "photos": rows.identity},
    }
    return ray_train.Trainer(
        train_loop_per_worker,
        post_placement_group=in_tune,
        train_loop_config=loop_config,
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
            storage_path=storage.checkpoint_storage(cfg.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(
                # Each try that cannot place the workers is a controller failure; the one past the limit ends the run.
                max_failures=cfg.max_failures, controller_failure_limit=placement_tries() - 1
            ),
            logging_config=LoggingConfig(log_level="WARNING"),  # not a line per report
            callbacks=callbacks,
        ),
    )
