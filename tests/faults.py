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
import pyarrow.fs as pafs
import pytest

from clf import storage
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


def has_checkpoint(run_dir) -> bool:
    """Whether Ray Train has registered a checkpoint in `run_dir` (a local folder or a URI): it writes this
    file once it has, and a restart can then use it."""
    snapshot = storage.Place.of(f"{str(run_dir).rstrip('/')}/checkpoint_manager_snapshot.json")
    return snapshot.kind() == pafs.FileType.File


def kill_worker_after_first_checkpoint(run_dir, killed: list, workers) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if has_checkpoint(run_dir):
            for worker in workers():
                worker.send_signal(signal.SIGKILL)
                killed.append(worker.pid)
            return
        time.sleep(0.2)


@contextlib.contextmanager
def worker_killed_after_first_checkpoint(run_dir, workers=training_workers):
    """While the block runs, SIGKILL the training workers `workers()` finds (default: those this process
    started) once Ray Train has registered a checkpoint in `run_dir`; yields the list of pids killed."""
    killed: list[int] = []
    killer = threading.Thread(target=kill_worker_after_first_checkpoint, args=(run_dir, killed, workers))
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


def wait_for_checkpoint(run_dir: Path | str, driver: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until Ray Train has registered a checkpoint of the run (a restart can then resume from it)."""
    deadline = time.monotonic() + timeout
    while not has_checkpoint(run_dir):
        if driver.poll() is not None:
            pytest.fail(f"the driver ended (exit {driver.returncode}) before a checkpoint:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint registered in {run_dir} within {timeout} s")
        time.sleep(0.1)


def wait_for_process(driver: subprocess.Popen, prefix: str, log: Path, timeout: float = 300) -> str:
    """Until the driver (or a process it started) runs a process whose name starts with `prefix`; its name."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for p in psutil.Process(driver.pid).children(recursive=True):
                try:
                    if p.name().startswith(prefix):
                        return p.name()
                except psutil.NoSuchProcess:
                    continue
        except psutil.NoSuchProcess:
            pass
        if driver.poll() is not None:
            pytest.fail(f"the driver ended (exit {driver.returncode}) before a {prefix} ran:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {prefix} within {timeout} s")
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
