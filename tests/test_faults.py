"""Real faults: a training worker process killed with SIGKILL mid-run."""

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest

from clf import checkpoint
from clf.config import ClfError, TrainConfig
from clf.train import fit
from conftest import real_subset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subset(real_data):
    return real_subset(real_data, 8000, seed=1)


def training_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def kill_worker_after_first_checkpoint(run_dir, killed: list) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        # Ray Train writes this file once it has registered a checkpoint: a restart can then use it.
        if (run_dir / "checkpoint_manager_snapshot.json").is_file():
            for worker in training_workers():
                worker.send_signal(signal.SIGKILL)
                killed.append(worker.pid)
            return
        time.sleep(0.1)


@contextlib.contextmanager
def worker_killed_after_first_checkpoint(run_dir):
    """While the block runs, SIGKILL the training worker once Ray Train has registered a checkpoint;
    yields the list of pids killed."""
    killed: list[int] = []
    killer = threading.Thread(target=kill_worker_after_first_checkpoint, args=(run_dir, killed))
    killer.start()
    try:
        yield killed
    finally:
        killer.join()


def four_epochs(tmp_path, max_failures: int) -> TrainConfig:
    return TrainConfig(
        epochs=4, batch_size=64, num_workers=1, cpus_per_worker=2, storage_path=str(tmp_path), max_failures=max_failures
    )


def test_killed_worker_resumes_from_the_checkpoint_and_ends_as_if_never_killed(ray_local, subset, tmp_path):
    cfg = four_epochs(tmp_path, max_failures=2)
    with worker_killed_after_first_checkpoint(tmp_path / "faulty") as killed:
        result = fit(cfg.replace(run_name="faulty"), subset)

    assert killed, "no training worker was found to kill"
    assert result.metrics["epoch"] == 4
    assert result.metrics["resumed_from_epoch"] >= 1  # the second attempt started from a checkpoint
    checkpoint.load_model(result.checkpoint.path)

    # Same seed, same workers, never killed: the same numbers, so the resumed run lost and repeated nothing.
    clean = fit(cfg.replace(run_name="clean"), subset)
    assert clean.metrics["resumed_from_epoch"] == 0
    assert result.metrics["loss"] == clean.metrics["loss"]
    assert result.metrics["accuracy"] == clean.metrics["accuracy"]


def test_without_retries_a_killed_worker_fails_the_run(ray_local, subset, tmp_path):
    with worker_killed_after_first_checkpoint(tmp_path / "fragile") as killed:
        with pytest.raises(ClfError, match="training failed"):
            fit(four_epochs(tmp_path, max_failures=0).replace(run_name="fragile"), subset)
    assert killed
