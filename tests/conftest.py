"""Shared fixtures: a Ray of our own on loopback, tiny synthetic data, the real data when installed."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Ray >= 2.59 turns token auth on for new local clusters unless told; the in-process clusters of these
# tests are loopback-only and say so explicitly. (The job-submission test uses token auth.)
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from clf import data  # noqa: E402
from clf.job import LOCAL_RAY, LOOPBACK_ENV  # noqa: E402

os.environ.update(LOOPBACK_ENV)  # before ray is imported: every Ray of the tests on 127.0.0.1


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray for one test module, stopped after it (only this process's own Ray)."""
    import ray

    ray.init(**LOCAL_RAY, num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def real_data() -> data.FashionMNIST:
    try:
        return data.load()
    except data.DataError as e:
        pytest.fail(f"the real Fashion-MNIST is needed for this test: {e}")


def real_subset(real: data.FashionMNIST, n: int, seed: int) -> data.Split:
    """`n` training images of the real data, drawn at random with `seed`."""
    keep = np.random.default_rng(seed).permutation(len(real.train.labels))[:n]
    return data.Split(images=real.train.images[keep], labels=real.train.labels[keep])


def html_references(html: str) -> list[tuple[str, str]]:
    """(tag, value) of every src and href in an HTML page."""

    class References(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend((tag, value) for name, value in attrs if name in ("src", "href") and value)

    found: list[tuple[str, str]] = []
    References().feed(html)
    return found


def real_dataset_dir(real: data.FashionMNIST, folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A data folder (the four idx .gz files) holding a random subset of the real data."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        part = getattr(real, split)
        keep = rng.permutation(len(part.labels))[:n]
        write_split(folder, split, part.images[keep], part.labels[keep])
    return folder


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    """One split's images and labels files under the names Fashion-MNIST gives them."""
    images_name, labels_name = data.FILES[split]
    write_idx(folder / images_name, images, gz=gz)
    write_idx(folder / labels_name, labels, gz=gz)


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True, magic: int | None = None) -> Path:
    """Write `array` (uint8) in the idx format: magic (0x0800 | ndim), big-endian dimensions, bytes."""
    header = struct.pack(">I", magic if magic is not None else 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_dataset_dir(folder: Path, n_train: int = 64, n_test: int = 32, seed: int = 0, gz: bool = True) -> Path:
    """Four idx files of random images and labels, as Fashion-MNIST lays them out."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_split(folder, split, images, rng.integers(0, 10, n, dtype=np.uint8), gz=gz)
    return folder


RUN = """
import json, sys
from clf.config import TrainConfig
from clf.job import run
r = run(TrainConfig(epochs=1, output=sys.argv[1], storage_path=sys.argv[2]))
print("RESULT " + json.dumps({"predictions": r.predictions, "accuracy": r.accuracy, "precision": r.precision,
                              "recall": r.recall, "classes": r.classes, "output": str(r.output)}))
"""


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """`run()` for one epoch on the real data in a fresh process, as a user's script would call it, with
    its embedded Ray; meanwhile, every TCP port that the process and its descendants listen on is
    recorded. Shared by the job's tests and the tagging tests (which tag with its checkpoint)."""
    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    env = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV}  # the job must see to it itself
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(out), str(out.parent / "ray")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    listening = set()
    while proc.poll() is None:
        listening |= listening_addresses(proc.pid)
        time.sleep(1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["output"] = Path(result["output"])
    return SimpleNamespace(**result, listening=listening, log=stdout + stderr)


def listening_addresses(pid: int) -> set[tuple[str, str]]:
    """(process name, local address) of every listening TCP socket of `pid` and its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for p in procs:
        try:
            found |= {(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
