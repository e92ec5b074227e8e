"""The training step and the epoch loop, in plain PyTorch: the Ray Train worker (`clf.trainer`) and the
plain baseline of the benchmarks run these same functions.

Data: each rank holds its part of the training set as uint8 arrays, in id order (`clf.data.Blocks.take`; the
whole set in the plain baseline), and each epoch cuts a seeded permutation of it into as many batches as the
global batch size gives steps. Same data, seed and worker count, same batches.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clf.config import TrainConfig
from clf.data import preprocess
from clf.model import FashionCNN


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Optimizer steps per epoch: set by the global batch size alone, so the schedule does not change
    when an elastic run continues with fewer workers."""
    return -(-num_images // batch_size)


def epoch_batches(num_images: int, epoch: int, seed: int, steps: int) -> list[np.ndarray]:
    """Batches of indices into a rank's `num_images` images for one epoch: a permutation seeded by (seed,
    epoch) cut into `steps` nearly equal parts, each sorted for faster gathering. Every rank takes `steps`
    (the global schedule's steps per epoch, whatever the number of workers), so with equal shards each batch
    is about batch_size / world_size images, and a DDP step finds every rank."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    return [np.sort(part) for part in np.array_split(order, steps)]


@dataclass
class Learner:
    """The model and everything that changes it: what a checkpoint must keep to resume."""

    model: nn.Module  # DDP-wrapped when there is more than one worker
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module


def new_model(cfg: TrainConfig, num_classes: int) -> FashionCNN:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    return FashionCNN.of_width(cfg.width, num_classes=num_classes)


def make_learner(cfg: TrainConfig, model: nn.Module, num_images: int, state: dict | None = None) -> Learner:
    """Adam with a one-cycle schedule over the whole run; `state` (a checkpoint's train state) resumes it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One-cycle: warm up to cfg.lr over the first 25% of steps, then anneal; it is what gets a small CNN
    # past 90% in one or two epochs.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch(num_images, cfg.batch_size),
        pct_start=0.25,
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return Learner(model, optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))


def step(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch of model inputs; returns the batch's loss and logits."""
    logits = learner.model(x)
    loss = learner.loss_fn(logits, y)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()
    learner.scheduler.step()
    return loss, logits


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Make glibc's malloc keep the memory a training step frees for the next step, instead of handing it
    back to the kernel and faulting fresh pages in again: fixed thresholds (up to 32 MiB blocks from the
    heap, up to 64 MiB of free heap kept) in place of the ones glibc adapts as it goes. With the adaptive
    ones, an epoch's page faults, and so its time, depend on the order the first tensors happened to be freed
    in, more often the slow way in a thread that is not the main one (where Ray Train runs the training
    function); docs/performance.md has the figures. False where the C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


# A batch as the data gives it: uint8 images (N, 28, 28) and int64 class indices (N,), numpy arrays.
Batch = tuple[np.ndarray, np.ndarray]


def array_batches(images: np.ndarray, labels: np.ndarray, epoch: int, cfg: TrainConfig,
                  num_train: int) -> Iterator[Batch]:
    """This rank's batches of its arrays for one epoch (see `epoch_batches`); `num_train`: the training
    images of all ranks, which set the steps per epoch."""
    for index in epoch_batches(len(labels), epoch, cfg.seed, steps_per_epoch(num_train, cfg.batch_size)):
        yield images[index], labels[index]


def train_epoch(learner: Learner, batches: Iterable[Batch], epoch: int, cfg: TrainConfig, rank: int,
                device: torch.device, after_step: Callable[[int, int], None] | None = None
                ) -> tuple[torch.Tensor, float]:
    """One epoch over this rank's batches. Returns (loss summed over images, correct predictions, images),
    this rank's alone, and the seconds spent waiting for the next batch. `after_step(epoch, steps done)`,
    if given, after each step (for progress)."""
    # Dropout's randomness depends on (seed, rank, epoch) only, so a resumed run matches.
    torch.manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)
    learner.model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    waited, batches, steps = 0.0, iter(batches), 0
    while True:
        asked = time.perf_counter()
        images, labels = next(batches, (None, None))
        waited += time.perf_counter() - asked
        if images is None:
            return totals, waited
        x = preprocess(torch.from_numpy(images).to(device))
        y = torch.from_numpy(labels).to(device)
        loss, logits = step(learner, x, y)
        with torch.no_grad():  # no .item(): on a GPU that would wait for every step
            totals[0] += loss.detach() * len(y)
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(y)
        steps += 1
        if after_step is not None:
            after_step(epoch, steps)


@torch.no_grad()
def validate(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
             batch_size: int = 1024) -> torch.Tensor:
    """This rank's (cross-entropy summed over images, correct predictions, images) on held-out rows, in eval
    mode (dropout off, BatchNorm's running statistics), as float64 on `device`."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, len(labels), batch_size):
        x = preprocess(torch.from_numpy(images[start:start + batch_size]).to(device))
        y = torch.from_numpy(labels[start:start + batch_size]).to(device)
        logits = model(x)
        totals[0] += nn.functional.cross_entropy(logits, y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    return totals


def train_epochs(learner: Learner, batches_of_epoch: Callable[[int], Iterable[Batch]], cfg: TrainConfig, *,
                 start_epoch: int = 0, rank: int = 0, device: torch.device = torch.device("cpu"),
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.cpu(),
                 after_epoch: Callable[[dict], None] = lambda record: None,
                 after_step: Callable[[int, int], None] | None = None, validation: Batch | None = None) -> list[dict]:
    """The loop every worker runs, and the plain baseline too: epochs `start_epoch`..cfg.epochs over the
    batches `batches_of_epoch(epoch)` gives, each ending in a record (loss, accuracy, images/s, elapsed,
    seconds this rank waited for data; with `validation`, this rank's held-out rows, their loss and accuracy)
    of the totals `reduce` sums over the ranks, handed to `after_epoch` (Ray's report and checkpoint). Returns
    the records."""
    keep_freed_memory()
    started, records = time.perf_counter(), []
    for epoch in range(start_epoch, cfg.epochs):
        epoch_started = time.perf_counter()
        totals, waited = train_epoch(learner, batches_of_epoch(epoch), epoch, cfg, rank, device, after_step)
        loop_s = time.perf_counter() - epoch_started
        loss_sum, correct, count = reduce(totals).tolist()
        seconds = time.perf_counter() - epoch_started
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / count,  # mean over every image of every rank this epoch
            "accuracy": correct / count,
            "images_per_s": count / seconds,
            "elapsed_s": time.perf_counter() - started,
            "loop_s": loop_s,  # first batch to last optimizer step, this rank's (before the reduce and report)
            "data_wait_s": waited,  # rank 0's (or this rank's): time the loop stood waiting for a batch
        }
        if validation is not None:
            # The module itself, not DDP's wrapper: a wrapped forward broadcasts buffers, a collective that a rank
            # with no held-out rows (fewer than the workers) never joins. Each rank counts its own rows.
            module = getattr(learner.model, "module", learner.model)
            val_loss, val_correct, val_count = reduce(validate(module, *validation, device)).tolist()
            record |= {"val_loss": val_loss / max(val_count, 1), "val_accuracy": val_correct / max(val_count, 1)}
        records.append(record)
        after_epoch(record)
    return records
