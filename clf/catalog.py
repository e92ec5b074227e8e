"""A store's own labelled photos: listed, split, then read and converted once by Ray Data, for training
(streamed to the workers as shards) and evaluation (the same predictor as the test set's).

A catalog is a folder with one sub-folder per class (torchvision's ImageFolder layout) or a .parquet / .csv
listing with `path` and `label` columns. Classes are the sorted names found. The held-out split is decided
from the sorted paths and the seed alone, so the same files give the same split in either layout and any
order. The one pass over the files (Ray Data tasks, `clf.tagging.photos.read_photos`, the conversion tagging
uses) keeps the 28x28 results in Ray's object store, spread over the nodes: the driver holds paths and
labels, never images. Files that cannot be read are skipped, counted and listed with their reason.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray.data

from clf.config import TrainConfig
from clf.data import TrainingData
from clf.errors import DataError, first_line
from clf.report import reasons
from clf.tagging import photos

# Photos per Ray Data block: a task reads and converts this many.
PHOTOS_PER_BLOCK = 256


def list_labelled(source: str, flag: str) -> pd.DataFrame:
    """(path, label) of every photo: absolute paths, class names as given by the layout."""
    path = Path(source)
    if path.is_dir():
        classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{flag} {source} holds no class sub-folders ({flag} FOLDER/<class name>/<photos>)")
        rows = [
            (str(f.resolve()), folder.name)
            for folder in classes
            for f in sorted(folder.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        ]
        return pd.DataFrame(rows, columns=["path", "label"])
    if not path.exists():
        raise DataError(f"{flag} {source} does not exist")
    if path.suffix.lower() not in (".parquet", ".csv"):
        raise DataError(f"{flag} {source} is neither a folder nor a .parquet or .csv listing")
    try:
        listing = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(
            path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as e:  # pandas' and pyarrow's errors for an unreadable listing
        raise DataError(f"{flag} {source} cannot be read as a listing ({first_line(e)})") from None
    if not {"path", "label"} <= set(listing.columns):
        raise DataError(f"{flag} {source} needs `path` and `label` columns (it has: {', '.join(map(str, listing.columns))})")
    base = path.resolve().parent
    return pd.DataFrame({
        "path": [str(base / p) if p and not os.path.isabs(p) else str(p) for p in listing["path"].astype(str)],
        "label": listing["label"].astype(str).to_numpy(),
    })


def hold_out(listing: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded, stratified split: of each class's sorted paths, round(fraction x count) (at least one when
    the class has two or more) go to evaluation. Depends on the set of (path, label) and the seed alone."""
    train, held = [], []
    for label, group in listing.sort_values("path").groupby("label", sort=True):
        paths = group["path"].to_numpy()
        count = max(1, round(fraction * len(paths))) if len(paths) >= 2 else 0
        order = np.random.default_rng([seed, zlib.crc32(label.encode())]).permutation(len(paths))
        held.append(group.iloc[np.sort(order[:count])])
        train.append(group.iloc[np.sort(order[count:])])
    return pd.concat(train, ignore_index=True), pd.concat(held, ignore_index=True)


def digest(train: pd.DataFrame, held: pd.DataFrame) -> str:
    """What a resumed run must find again: the files of each split, their labels and sizes."""
    lines = []
    for split, frame in (("train", train), ("eval", held)):
        for path, label in sorted(zip(frame["path"], frame["label"])):
            size = os.stat(path).st_size if os.path.isfile(path) else -1
            lines.append(f"{split}\t{path}\t{label}\t{size}")
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Catalog:
    """The listed catalog, split, before any photo is read."""

    source: str
    train: pd.DataFrame  # path, label (class name)
    held: pd.DataFrame
    classes: list[str]
    seed: int

    def prepare(self) -> TrainingData:
        """Read and convert every photo once (Ray Data tasks); skip and list the ones that cannot be."""
        frame = pd.concat([self.train.assign(split="train"), self.held.assign(split="eval")], ignore_index=True)
        frame["id"] = np.arange(len(frame))
        frame["label"] = frame["label"].map({name: i for i, name in enumerate(self.classes)}).astype(np.int64)
        # Rows in a seeded random order: the listing is sorted by class, and the workers' shuffle is local
        # (a window of a few batches), so blocks in listing order would make batches of one class each.
        frame = frame.sample(frac=1, random_state=self.seed).reset_index(drop=True)
        blocks = max(1, -(-len(frame) // PHOTOS_PER_BLOCK))
        read = ray.data.from_pandas(frame).repartition(blocks).map_batches(
            photos.read_photos, batch_size=PHOTOS_PER_BLOCK, batch_format="numpy").materialize()
        outcome = read.select_columns(["id", "error"]).to_pandas().set_index("id")["error"]
        frame["error"] = frame["id"].map(outcome)
        skipped = self._check_readable(frame)
        good = frame[frame["error"] == ""]
        train_ids = good.loc[good["split"] == "train", "id"].to_numpy()
        eval_rows = good.loc[good["split"] == "eval", ["id", "path", "label"]].reset_index(drop=True)
        return TrainingData(
            classes=self.classes, source=self.source, identity=digest(self.train, self.held),
            train=_only(read, train_ids), num_train=len(train_ids), eval_rows=eval_rows,
            eval_dataset=lambda: _only(read, eval_rows["id"].to_numpy()),
            images_of=lambda ids: _images(eval_rows.set_index("id").loc[ids, "path"]),
            skipped=skipped, eval_name="evaluation photos",
        )

    def _check_readable(self, frame: pd.DataFrame) -> list[dict]:
        """The files to skip, with why; refuses a catalog that is mostly unreadable, or a class left without
        a photo to train on."""
        bad = frame[frame["error"] != ""].sort_values("path")
        if len(bad) * 2 > len(frame):
            raise DataError(f"{len(bad):,} of the {len(frame):,} photos in {self.source} cannot be read "
                            f"({reasons(bad['error'])}): is it the right folder?")
        trainable = set(frame.loc[(frame["error"] == "") & (frame["split"] == "train"), "label"])
        for index, name in enumerate(self.classes):
            if index not in trainable:
                raise DataError(f"class {name!r} of {self.source} has no readable photo to train on")
        return [{"path": p, "reason": r} for p, r in zip(bad["path"], bad["error"])]


def _images(paths) -> np.ndarray:
    """A few photos converted again on the driver (the report's confident mistakes)."""
    return np.stack([photos.load_file(p) for p in paths]) if len(paths) else np.zeros((0, 28, 28), np.uint8)


def _only(dataset: ray.data.Dataset, ids: np.ndarray) -> ray.data.Dataset:
    """The rows of `dataset` whose id is in `ids` (id, path, label, image), materialized: read once,
    iterated every epoch."""
    wanted = np.sort(ids)

    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = np.isin(batch["id"], wanted, assume_unique=True)
        return {name: batch[name][mask] for name in ("id", "path", "label", "image")}

    return dataset.map_batches(keep, batch_format="numpy").materialize()


def open_catalog(cfg: TrainConfig) -> Catalog:
    """List --train-data (and --eval-data, or hold out --eval-fraction of each class); check the classes."""
    listing = list_labelled(cfg.train_data, "--train-data")
    if cfg.eval_data is not None:
        train, held = listing, list_labelled(cfg.eval_data, "--eval-data")
    else:
        train, held = hold_out(listing, cfg.eval_fraction, cfg.seed)
    classes = sorted(set(train["label"]))
    if len(classes) < 2:
        raise DataError(f"--train-data {cfg.train_data} has {len(classes)} class(es); a classifier needs two or more")
    strangers = sorted(set(held["label"]) - set(classes))
    if strangers:
        raise DataError(f"the evaluation photos have class {strangers[0]!r}, which the training photos lack")
    if held.empty:
        raise DataError(f"no photo is held out for evaluation from --train-data {cfg.train_data}")
    return Catalog(source=str(cfg.train_data), train=train, held=held, classes=classes, seed=cfg.seed)
