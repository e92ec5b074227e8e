"""Training under Ray Train: the per-worker loop, the TorchTrainer around it, checkpoint save and restore.

Data: the driver reads Fashion-MNIST once and puts the uint8 arrays (47 MB for the training set) in Ray's
object store; each worker maps them zero-copy from its node's store (one transfer per node) and takes
its shard each epoch the way torch's DistributedSampler does: one seeded permutation shared by all
ranks, rank r taking every world_size-th index. Same seed and worker count, same batches.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clf import checkpoint as ckpt
from clf.config import ClfError, ConfigError, TrainConfig
from clf.data import CLASSES, Split, preprocess
from clf.model import FashionCNN


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    device: torch.device


def setup_worker(cfg: TrainConfig) -> Worker:
    """Threads, seeds and device for this training worker: the one place they are decided."""
    import ray.train
    import ray.train.torch

    # Ray starts workers with OMP_NUM_THREADS=1; give torch the CPUs this worker reserved.
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    ctx = ray.train.get_context()
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def shard_order(num_images: int, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's image indices for one epoch. Every rank gets the same count (a DDP step needs all)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    per_rank = num_images // world_size
    return order[rank::world_size][:per_rank]


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Optimizer steps per epoch: set by the global batch size alone, so the schedule does not change
    when an elastic run continues with fewer workers."""
    return -(-num_images // batch_size)


def epoch_batches(num_images: int, epoch: int, seed: int, rank: int, world_size: int, batch_size: int):
    """This rank's batches of image indices for one epoch: its shard cut into `steps_per_epoch` nearly
    equal parts (about batch_size / world_size images each), sorted for faster gathering."""
    shard = shard_order(num_images, epoch, seed, rank, world_size)
    return [np.sort(part) for part in np.array_split(shard, steps_per_epoch(num_images, batch_size))]


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["config"])
    worker = setup_worker(cfg)
    images, labels = (ray.get(ref) for ref in loop_config["train"])
    steps = steps_per_epoch(len(labels), cfg.batch_size)

    start_epoch, state = 0, None
    model = FashionCNN()
    resume_from = ray.train.get_checkpoint()
    if resume_from is not None:
        with resume_from.as_directory() as folder:
            model, _ = ckpt.load_model(folder)
            state = ckpt.load_train_state(folder)
        start_epoch = state["epoch"]
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world_size > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One-cycle: warm up to cfg.lr over the first 25% of steps, then anneal; it is what gets a small
    # CNN past 90% in one or two epochs.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.25
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if worker.rank == 0:
            _say(f"resumed from the checkpoint after epoch {start_epoch}")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    started = time.perf_counter()

    for epoch in range(start_epoch, cfg.epochs):
        epoch_started = time.perf_counter()
        # Dropout's randomness depends on (seed, rank, epoch) only, so a resumed run matches.
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1009 + worker.rank)
        batches = epoch_batches(len(labels), epoch, cfg.seed, worker.rank, worker.world_size, cfg.batch_size)
        model.train()
        # Summed over this rank's images: loss, correct predictions, images; all-reduced at the end.
        totals = torch.zeros(3, dtype=torch.float64, device=worker.device)
        for index in batches:
            x = preprocess(torch.from_numpy(images[index]).to(worker.device))
            y = torch.from_numpy(labels[index]).to(worker.device)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # no .item(): on a GPU that would wait for every step
                totals[0] += loss.detach() * len(y)
                totals[1] += (logits.argmax(1) == y).sum()
                totals[2] += len(y)

        loss_sum, correct, count = _all_reduce(totals).tolist()
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_sum / count,  # mean over every image of every rank this epoch
            "accuracy": correct / count,
            "images_per_s": count / (time.perf_counter() - epoch_started),
            "elapsed_s": time.perf_counter() - started,
            "resumed_from_epoch": start_epoch,  # 0: this attempt started from scratch
            "workers": worker.world_size,  # fewer than asked after a lost node, in an elastic run
        }
        _report(metrics, model, optimizer, scheduler, worker, cfg)


# The settings a run must keep to be resumed: with other ones, its checkpoint is from another experiment.
RESUME_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "seed")


def run_settings(cfg: TrainConfig) -> dict:
    return {name: getattr(cfg, name) for name in RESUME_SETTINGS}


def storage_uri(storage_path: str | None) -> str:
    """Ray Train's storage as an absolute path or a URI (s3://, gs://)."""
    from ray.train.constants import DEFAULT_STORAGE_PATH

    if storage_path is None:
        return DEFAULT_STORAGE_PATH
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def run_folder(cfg: TrainConfig) -> str:
    return f"{storage_uri(cfg.storage_path).rstrip('/')}/{cfg.run_name}"


def previous_run(cfg: TrainConfig) -> dict | None:
    """The train state of the latest checkpoint of an earlier run of this name in the storage, if any:
    `fit` with the same name and storage resumes from it."""
    from ray.train import Result

    try:
        earlier = Result.from_path(run_folder(cfg))
    except RuntimeError:  # no such run folder, or no checkpoint registered in it
        return None
    if earlier.checkpoint is None:
        return None
    with earlier.checkpoint.as_directory() as folder:
        return ckpt.load_train_state(folder)


def check_resumable(state: dict, cfg: TrainConfig) -> None:
    """Refuse to continue a run with settings other than those it was started with."""
    before, now = state.get("settings", {}), run_settings(cfg)
    changed = [f"{name} {before.get(name)!r} -> {now[name]!r}" for name in now if before.get(name) != now[name]]
    if changed:
        raise ConfigError(
            f"run {cfg.run_name!r} in {storage_uri(cfg.storage_path)} was started with other settings "
            f"({', '.join(changed)}); resume it with its own settings or choose a new --run-name"
        )


def _say(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver. Not print(): Ray Train's
    patched print() would echo it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _all_reduce(totals: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, so the figures reported are for all the data, not rank 0's shard."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.cpu()


def _report(metrics, model, optimizer, scheduler, worker: Worker, cfg: TrainConfig) -> None:
    """Every rank reports (it is a barrier); rank 0 alone writes the checkpoint, as the weights agree."""
    import ray.train

    if worker.rank != 0:
        ray.train.report(metrics)
        return
    _say(
        f"epoch {metrics['epoch']}/{cfg.epochs}  loss {metrics['loss']:.4f}  "
        f"train accuracy {metrics['accuracy']:.4f}  {metrics['images_per_s']:,.0f} images/s  "
        f"{metrics['elapsed_s']:.1f} s"
    )
    with tempfile.TemporaryDirectory(prefix="clf-ckpt-") as folder:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": metrics["epoch"],  # epochs completed
            "settings": run_settings(cfg),
        }
        ckpt.save(folder, model, CLASSES, train_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# After a failure a run of fixed size waits for all its workers to be placed again; each wait lasts
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default 60 s) and counts as a controller failure. This many
# (about ten minutes: time for an autoscaler to bring a replacement node) and the run fails with a clear
# message instead of waiting for ever on a cluster that will not grow. Ray's default: no limit.
PLACEMENT_WAITS = 10


def fit(cfg: TrainConfig, train: Split):
    """Train with a TorchTrainer on the connected Ray cluster; the Result's checkpoint is the final model."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    # The controller checks on the workers this often (Ray's default: 2 s). The end of training is
    # noticed at the next check, so on short runs the default adds a second on average; Ray Train
    # passes this variable from the driver to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    num_workers = cfg.num_workers
    if cfg.min_workers is not None and cfg.min_workers < cfg.num_workers:
        # Elastic: start with what can be placed, down to min_workers; after a lost node, wait for a
        # replacement only as long as RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), then go on with
        # the workers that fit.
        num_workers = (cfg.min_workers, cfg.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            # Put once by the driver; workers read them from the object store instead of the disk.
            "train": (ray.put(train.images), ray.put(train.labels)),
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run_name,  # None: Ray picks a new name
            storage_path=storage_uri(cfg.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=PLACEMENT_WAITS),
            logging_config=LoggingConfig(log_level="WARNING"),  # not a line per report
        ),
    )
    # fit() installs a Ctrl-C handler that holds the controller actor's handle and stays after fit()
    # returns, which keeps the finished controller (about 0.4 GiB) alive through inference; putting the
    # previous handler back lets Ray end it, and Ctrl-C after training means what it meant before.
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; show its last line, not a traceback
        failure = getattr(e, "controller_failure", None)
        if type(failure).__name__ == "WorkerGroupStartupTimeoutError":
            raise ClfError(
                f"training failed: after a failure, {failure.num_workers} workers could not be placed again "
                f"in {PLACEMENT_WAITS + 1} tries (a node lost for good?); with --min-workers a run goes on "
                "with the workers that fit"
            ) from None
        raise ClfError(f"training failed: {_last_line(e)}") from None
    finally:
        if ctrl_c is not None and signal.getsignal(signal.SIGINT) is not ctrl_c:
            signal.signal(signal.SIGINT, ctrl_c)
    if result.checkpoint is None:
        raise ClfError("training finished without a checkpoint")
    return result


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
