"""Real faults for the tests: a training worker SIGKILLed once Ray Train has a checkpoint, a driver started,
killed and started again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT
from tests.ray_cluster import kill_survivors

TRAIN = str(ROOT / "jobs" / "train.py")


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


def start_driver(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, TRAIN, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT
    )


def wait_for_checkpoint(run_dir: Path, driver: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until Ray Train has registered a checkpoint of the run (a restart can then resume from it)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        if driver.poll() is not None:
            pytest.fail(f"the driver ended (exit {driver.returncode}) before a checkpoint:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint registered in {run_dir} within {timeout} s")
        time.sleep(0.1)


def kill_driver(driver: subprocess.Popen) -> None:
    """SIGKILL the driver alone, as a crash or an OOM kill would; then stop what it had started (its
    embedded Ray) if that outlives it."""
    started = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    kill_survivors(started, grace_s=15)


def finish(driver: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_driver(driver)
        pytest.fail(f"the driver did not finish within {timeout} s:\n{log.read_text()[-3000:]}")
    return log.read_text()
