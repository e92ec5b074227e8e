"""Fashion-MNIST: where it is found, how it is read, how images become model input; rows as Ray data.

The four original idx files are read with numpy. `preprocess()` is the one preprocessing: the training loop
calls it, and the inference model carries it (`clf.checkpoint.inference_model`, exported to ONNX with the
model). This module imports no torch: tagging's driver reads rows through it.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clf.errors import DataError
from clf.photos import IMAGE_SIZE

if TYPE_CHECKING:
    import torch

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Mean and standard deviation of the training images' pixels, after scaling to [0, 1].
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

# The validation split (--validation, jobs/tune.py): this many training images (a twelfth if fewer), the same
# ones every run.
VALIDATION_ROWS = 5000
VALIDATION_SEED = 20171025  # Fashion-MNIST's release; any fixed number would do

DATA_DIR_ENV = "CLF_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx magic numbers: 0x08 = unsigned bytes, then the number of dimensions.
MAGIC = {"images": 0x00000803, "labels": 0x00000801}
HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist`, pass --data-dir with the four idx files, "
    "or pass --download on a machine with internet"
)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8, as stored
    labels: np.ndarray  # (N,) int64 class indices


@dataclass(frozen=True)
class TrainingRows:
    """What training's workers fetch: the training rows and those held out to validate on, in Ray's object store,
    the classes they are of, and their identity (what a resumed run must find again)."""

    train: Blocks
    validation: Blocks | None
    classes: list[str]
    identity: str


@dataclass(frozen=True)
class TrainingData:
    """What a training run needs of its data, whichever it is (Fashion-MNIST, a store's catalog): the rows to train
    on (and validate on), and the evaluation rows."""

    classes: list[str]
    source: str  # where it was read from, for people
    identity: str  # what a resumed run must find again: a name, or a digest of the files
    train: Blocks  # the decoded training rows (id, label, image, ...) in Ray's object store, in a fixed order
    num_train: int
    eval_rows: pd.DataFrame  # id, label (and path): every row the evaluation must give back
    eval_dataset: Callable[[], Any]  # a Ray Dataset of the evaluation rows, with their images
    images_of: Callable[[np.ndarray], np.ndarray]  # evaluation ids -> their 28x28 images (the report's)
    skipped: list[dict] = field(default_factory=list)  # files left out: {"path", "reason"}
    eval_name: str = "test images"  # what the evaluation rows are, for people
    validation: Blocks | None = None  # rows held out of training to select settings on (never the test set)

    @property
    def unit(self) -> str:
        """What one row is, for people: images (Fashion-MNIST) or photos (a catalog)."""
        return self.eval_name.split()[-1]

    @property
    def rows(self) -> TrainingRows:
        return TrainingRows(self.train, self.validation, self.classes, self.identity)

    def without_validation(self) -> TrainingData:
        """The same data with its held-out rows trained on too (a search's final run)."""
        if self.validation is None:
            return self
        return dataclasses.replace(self, train=self.train + self.validation,
                                   num_train=self.num_train + self.validation.num_rows, validation=None)


@dataclass(frozen=True)
class FashionMNIST:
    train: Split
    test: Split
    source: str  # the folder the files were read from

    identity = "fashion-mnist"  # what a resumed run must find again: read on the driver, checked on reading

    def prepare(self, validation: bool = False) -> TrainingData:
        """The training rows in Ray's object store (less a fixed validation split, if asked for), and the test
        set to evaluate on."""
        ids = np.arange(len(self.train.labels))
        held = validation_ids(len(ids)) if validation else ids[:0]
        kept = np.setdiff1d(ids, held)
        return TrainingData(
            classes=list(CLASSES), source=self.source, identity=self.identity,
            train=Blocks.put(tables(self.train, ids=kept)), num_train=len(kept),
            eval_rows=pd.DataFrame({"id": np.arange(len(self.test.labels)), "label": self.test.labels}),
            eval_dataset=lambda: to_ray_dataset(self.test), images_of=lambda ids: self.test.images[ids],
            validation=Blocks.put(tables(self.train, ids=held)) if len(held) else None,
        )


def validation_ids(rows: int) -> np.ndarray:
    """The training rows held out for validation, of `rows`: VALIDATION_ROWS of them (a twelfth if fewer: 5,000 of
    60,000 is a twelfth), drawn with a fixed seed, so the same every run and on every machine; sorted."""
    count = min(VALIDATION_ROWS, rows // 12)
    return np.sort(np.random.default_rng(VALIDATION_SEED).permutation(rows)[:count])


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clf" / "fashion-mnist"


def candidate_dirs(data_dir: str | None) -> list[Path]:
    """The places searched, in order: --data-dir, $CLF_DATA_DIR, Debian's package, the local cache."""
    if data_dir is not None:
        # An explicit folder is the only place looked at: silently falling back elsewhere would
        # train on data the user did not ask for.
        return [Path(data_dir)]
    dirs = []
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]))
    dirs += [DEBIAN_DIR, cache_dir()]
    return dirs


def _find_file(folder: Path, name: str) -> Path | None:
    # Accept the original .gz files, their uncompressed form, and torchvision's download layout.
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for candidate in (sub / name, sub / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _files_in(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    found = {}
    for split, names in FILES.items():
        paths = tuple(_find_file(folder, n) for n in names)
        if None in paths:
            return None
        found[split] = paths
    return found


def locate(data_dir: str | None = None, download: bool = False) -> tuple[Path, dict]:
    """Find a folder holding all four files; download into the cache only when asked to."""
    tried = candidate_dirs(data_dir)
    for folder in tried:
        files = _files_in(folder)
        if files is not None:
            return folder, files
    if download and data_dir is None:
        _download(cache_dir())
        files = _files_in(cache_dir())
        if files is not None:
            return cache_dir(), files
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder; {HOW_TO_GET}")
    places = ", ".join(str(p) for p in tried)
    raise DataError(f"Fashion-MNIST not found (looked in {places}); {HOW_TO_GET}")


def _download(root: Path) -> None:
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    try:
        TorchvisionFashionMNIST(str(root), train=True, download=True)
        TorchvisionFashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # torchvision raises several kinds on a failed download
        raise DataError(f"downloading Fashion-MNIST into {root} failed: {e}") from None


def read_idx(path: Path, kind: str) -> np.ndarray:
    """One idx file (.gz or not) as a uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = bytearray(f.read())  # writable: torch.from_numpy warns on read-only arrays
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable idx {kind} file ({e or type(e).__name__})") from None
    magic = int.from_bytes(raw[:4], "big")
    if magic != MAGIC[kind]:
        raise DataError(f"{path} has magic number {magic:#010x}, not {MAGIC[kind]:#010x} of an idx {kind} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is not a readable idx {kind} file (its header is cut short)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise DataError(
            f"{path} is not a readable idx {kind} file (its header says {shape}, "
            f"{math.prod(shape)} bytes; it holds {len(raw) - header})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_split(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, "images")
    labels = read_idx(labels_path, "labels")
    if tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{images_path} holds images of {tuple(images.shape[1:])}, not 28x28")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) == 0:
        raise DataError(f"{labels_path} holds no labels")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= len(CLASSES):
        raise DataError(f"{labels_path} has labels outside 0..{len(CLASSES) - 1} (found {low}..{high})")
    return Split(images=images, labels=labels.astype(np.int64))


def load(data_dir: str | None = None, download: bool = False) -> FashionMNIST:
    """Read the training and test sets once, on the driver."""
    folder, files = locate(data_dir, download)
    splits = {split: read_split(*paths) for split, paths in files.items()}
    return FashionMNIST(train=splits["train"], test=splits["test"], source=str(folder))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) or (N, 1, 28, 28), light item on dark, to normalised float (N, 1, 28, 28)."""
    x = images.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).float()
    return (x / 255.0 - PIXEL_MEAN) / PIXEL_STD


def tables(split: Split, rows_per_block: int = 2500, ids: np.ndarray | None = None) -> list:
    """The split's rows `ids` (default: all) as Arrow tables of `rows_per_block` rows (id, label, image); `id`
    is the row's index in the split."""
    import pyarrow as pa

    ids = np.arange(len(split.labels)) if ids is None else np.asarray(ids, dtype=np.int64)
    return [
        pa.table({
            "id": pa.array(part),
            "label": pa.array(split.labels[part]),
            # Arrow's own fixed-shape tensor type: Ray Data reads it, and making it needs no Ray.
            "image": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(split.images[part])),
        })
        for part in (ids[start:start + rows_per_block] for start in range(0, len(ids), rows_per_block))
    ]


def to_ray_dataset(split: Split, rows_per_block: int = 2500):
    """The split as a Ray Dataset of rows (id, label, image), its blocks made here."""
    import ray.data

    # from_blocks, not from_arrow: from_arrow works out each table's row count and schema in a Ray task,
    # which on a cluster just started (or just done training) means starting worker processes first. The
    # tables are here; their metadata is read here.
    return ray.data.from_blocks(tables(split, rows_per_block))


@dataclass(frozen=True)
class Blocks:
    """Rows in Ray's object store: Arrow tables (id, label, image: 28x28 uint8, and other columns) in a fixed
    order, with the number of rows each holds. The driver holds the references; each training worker fetches
    the blocks of its own part (`take`). Nothing coordinates the dealing: every rank works out the same cut
    from the row counts, so the same blocks, seed and world size always give the same parts."""

    refs: tuple  # ray.ObjectRef of a pyarrow.Table, in order
    counts: tuple[int, ...]  # rows of each block

    @classmethod
    def put(cls, tables: list) -> Blocks:
        import ray

        return cls(tuple(ray.put(t) for t in tables), tuple(t.num_rows for t in tables))

    @property
    def num_rows(self) -> int:
        return sum(self.counts)

    def __add__(self, other: Blocks) -> Blocks:
        return Blocks(self.refs + other.refs, self.counts + other.counts)

    def part(self, rank: int, world_size: int) -> list[tuple[int, int, int]]:
        """(block, first row, end row) of rank `rank`'s part: the rows, blocks end to end in order, cut into
        `world_size` runs as equal as whole rows allow (every row in exactly one part)."""
        total = self.num_rows
        first, end = rank * total // world_size, (rank + 1) * total // world_size
        pieces, offset = [], 0
        for index, count in enumerate(self.counts):
            start, stop = max(first, offset), min(end, offset + count)
            if start < stop:
                pieces.append((index, start - offset, stop - offset))
            offset += count
        return pieces

    def take(self, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank `rank`'s part, fetched from the object store: (images (N, 28, 28) uint8, labels (N,) int64) in
        id order, which makes the batches independent of how the rows were cut into blocks."""
        import ray
        from ray.data.block import BlockAccessor

        pieces = self.part(rank, world_size)
        columns = [BlockAccessor.for_block(table.slice(start, stop - start)).to_numpy(["id", "image", "label"])
                   for table, (_, start, stop) in zip(ray.get([self.refs[i] for i, _, _ in pieces]), pieces)]
        if not columns:
            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.zeros(0, np.int64)
        order = np.argsort(np.concatenate([c["id"] for c in columns]), kind="stable")
        images = np.concatenate([c["image"] for c in columns])[order]
        return images, np.concatenate([c["label"] for c in columns])[order].astype(np.int64)
