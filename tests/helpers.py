"""What the tests share besides fixtures: data writers, the real data's subsets, page and socket probes."""

from __future__ import annotations

import gzip
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import psutil

from clf import data

ROOT = Path(__file__).resolve().parent.parent

# The epoch table a training run prints at its end: its header and its first row.
def real_subset(real: data.FashionMNIST, n: int, seed: int) -> data.Split:
    """`n` training images of the real data, drawn at random with `seed`."""
    keep = np.random.default_rng(seed).permutation(len(real.train.labels))[:n]
    return data.Split(images=real.train.images[keep], labels=real.train.labels[keep])


def training_data(split: data.Split) -> data.TrainingData:
    """Fashion-MNIST-like training data for fit(): `split` to train on (evaluated on its first 100 images)."""
    test = data.Split(images=split.images[:100], labels=split.labels[:100])
    return data.FashionMNIST(train=split, test=test, source="a subset").prepare()


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


def with_descendants(pid: int) -> list[psutil.Process]:
    """The process `pid` and every process below it; none once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listening_addresses(pid: int) -> set[tuple[int, str]]:
    """(process id, local address) of every listening TCP socket of `pid` and its descendants."""
    found = set()
    for p in with_descendants(pid):
        try:
            found |= {(p.pid, c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def imported_torch(pid: int) -> bool | None:
    """Whether the process `pid` has imported torch (its library is mapped into the process); None if it is gone."""
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
