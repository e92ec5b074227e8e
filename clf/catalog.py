"""A store's own labelled photos: listed, split, then read and converted once, for training (each worker
fetches its part) and evaluation (the same predictor as the test set's).

A catalog is a folder with one sub-folder per class (torchvision's ImageFolder layout) or a .parquet / .csv
listing with `path` and `label` columns. Classes are the sorted names found. The held-out split is decided
from the sorted paths and the seed alone, so the same files give the same split in either layout and any
order. The one pass over the files (Ray tasks, `clf.photos.read_photos`, the conversion tagging uses) cuts
the training and evaluation photos into blocks of their own and keeps the 28x28 results in Ray's object
store, spread over the nodes: the driver holds paths, labels and what became of each file, never images.
Files that cannot be read are skipped, counted and listed with their reason.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray.data

from clf import console, storage
from clf.cluster import refuse_unseen
from clf.config import TrainConfig
from clf.data import Blocks, TrainingData
from clf.plan import Cluster
from clf.errors import ConfigError, DataError, first_line
from clf.report import reasons
from clf import photos

# Photos per block of the read pass: a task reads and converts this many.
PHOTOS_PER_BLOCK = 256


def list_labelled(source: str, flag: str) -> pd.DataFrame:
    """(path, label, size) of every photo: absolute paths or URIs, class names as given by the layout, sizes
    in bytes where the listing gives them without a request per file (a folder in object storage; -1 on a
    local disk and for the entries of a .parquet / .csv listing: the photos' digest takes the sizes read)."""
    place, kind = storage.locate(source, flag, DataError)
    if kind == pafs.FileType.Directory:
        folders = [i for i in place.fs.get_file_info(pafs.FileSelector(place.path)) if i.type == pafs.FileType.Directory]
        classes = sorted((i for i in folders if not i.base_name.startswith(".")), key=lambda i: i.base_name)
        if not classes:
            raise DataError(f"{flag} {source} holds no class sub-folders ({flag} FOLDER/<class name>/<photos>)")
        rows = [
            (place.location(path), folder.base_name, size)
            for folder in classes
            for path, size in storage.Place(place.fs, folder.path, place.scheme).files()
        ]
        return pd.DataFrame(rows, columns=["path", "label", "size"])
    if kind == pafs.FileType.NotFound:
        raise DataError(f"{flag} {source} does not exist")
    listing = read_listing(place, source, flag, DataError)
    if not {"path", "label"} <= set(listing.columns):
        raise DataError(f"{flag} {source} needs `path` and `label` columns (it has: {', '.join(map(str, listing.columns))})")
    return pd.DataFrame({"path": [place.resolve(p) for p in listing["path"].astype(str)],
                         "label": listing["label"].astype(str).to_numpy(), "size": -1})


def read_listing(place: storage.Place, source: str, flag: str, error: type[Exception]) -> pd.DataFrame:
    """A .parquet or .csv listing (every column read as given; a CSV's as strings); `error` for one that
    is neither, or cannot be read."""
    suffix = place.path.rsplit(".", 1)[-1].lower()
    if suffix not in ("parquet", "csv"):
        raise error(f"{flag} {source} is neither a folder nor a .parquet or .csv listing")
    try:
        raw = io.BytesIO(place.read_bytes())
        return pd.read_parquet(raw) if suffix == "parquet" else pd.read_csv(raw, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as e:  # pandas' and pyarrow's errors for an unreadable listing
        raise error(f"{flag} {source} cannot be read as a listing ({first_line(e)})") from None


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


def digest(rows: pd.DataFrame) -> str:
    """A fingerprint of photos: each one's split, path, label (class name) and size in bytes."""
    lines = sorted(f"{split}\t{path}\t{label}\t{size}"
                   for split, path, label, size in zip(rows["split"], rows["path"], rows["label"], rows["size"]))
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Catalog:
    """The listed catalog, split, before any photo is read."""

    source: str
    train: pd.DataFrame  # path, label (class name), size (-1: not known from the listing)
    held: pd.DataFrame
    classes: list[str]
    seed: int
    fraction: float  # of each class held out for evaluation (and, of the rest, for validation)
    sources: list[dict] = field(default_factory=list)  # each --train-data source's counts (`merge_sources`)
    relabelled: list[dict] = field(default_factory=list)  # path, from, to: each label a later source changed

    @cached_property
    def identity(self) -> str:
        """The listing's fingerprint (files, labels, the sizes it gives): a resumed run is checked against it
        before any photo is read."""
        return digest(self._listed())

    def _listed(self) -> pd.DataFrame:
        return pd.concat([self.train.assign(split="train"), self.held.assign(split="eval")], ignore_index=True)

    def check_every_node_reads(self, cluster: Cluster) -> None:
        """The photos are read by tasks on every node: those on the driver's disk must be seen by each (on
        one node, or in a shared NFS folder, they are)."""
        local = [path for path in (storage.local_path(p) for p in self._listed()["path"] if p) if path]
        refuse_unseen(cluster, storage.sample(local), f"--train-data {self.source} (its photos)")

    def prepare(self, validation: bool = False) -> TrainingData:
        """Read and convert every photo once, training and evaluation photos (and validation photos, held out
        of the training ones as the evaluation photos are of all, if asked for) in blocks of their own (a Ray
        task each, spread over the nodes); skip and list the ones that cannot be read."""
        frame = self._listed()
        if validation:
            _, held = hold_out(self.train, self.fraction, self.seed + 1)
            frame.loc[frame["split"].eq("train") & frame["path"].isin(set(held["path"])), "split"] = "validation"
        frame["id"] = np.arange(len(frame))
        frame["name"] = frame["label"]
        frame["label"] = frame["label"].map({name: i for i, name in enumerate(self.classes)}).astype(np.int64)
        # Rows in a seeded random order: the listing is sorted by class, and a block of one class would make
        # the evaluation's first batches one class each.
        frame = frame.sample(frac=1, random_state=self.seed).reset_index(drop=True)
        splits = {split: frame[frame["split"] == split] for split in ("train", "validation", "eval")
                 if (frame["split"] == split).any()}
        with console.Progress("reading photos", len(frame), "photos") as progress:
            read = read_blocks(splits, PHOTOS_PER_BLOCK, progress)
        outcome = pd.concat([pd.DataFrame(o) for split in read for o, _ in read[split]]).set_index("id")
        frame["error"], frame["size"] = frame["id"].map(outcome["error"]), frame["id"].map(outcome["size"])
        skipped = self._check_readable(frame)
        good = frame[frame["error"] == ""]
        eval_rows = good.loc[good["split"] == "eval", ["id", "path", "label"]].reset_index(drop=True)
        held = [ref for o, ref in read["eval"] if (o["error"] == "").any()]
        train, held_out = (Blocks(*zip(*[(ref, int((o["error"] == "").sum())) for o, ref in read[split]]))
                           if split in read else None for split in ("train", "validation"))
        return TrainingData(
            classes=self.classes, source=self.source,
            # The photos actually used, with the bytes read: a photo that could not be read this time (a
            # remote read that failed past its retries) changes it, so a resumed run cannot train on
            # another subset without a word.
            identity=digest(good.assign(label=good["name"])),
            train=train, num_train=train.num_rows, eval_rows=eval_rows,
            eval_dataset=lambda: ray.data.from_arrow_refs(held),
            images_of=lambda ids: _images(eval_rows.set_index("id").loc[ids, "path"]),
            skipped=skipped, eval_name="evaluation photos", validation=held_out,
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


def read_blocks(splits: dict[str, pd.DataFrame], per_block: int,
                progress: console.Progress) -> dict[str, list[tuple[dict, ray.ObjectRef]]]:
    """The photos of each split's rows (id, path, label) read and converted, a Ray task to each block of
    `per_block` consecutive rows of a split, every task submitted at once and spread over the nodes: for each
    split, its blocks in order, each as what became of its rows (id, error, size: `photos.read_rows`), fetched by
    the driver, and a reference to the Arrow table (id, path, label, image) of the rows that could be read,
    which stays where it was made."""
    read = ray.remote(num_returns=2, num_cpus=1, scheduling_strategy="SPREAD")(photos.read_rows)
    blocks = {split: [read.remote(*(rows[c].to_numpy()[i:i + per_block] for c in ("id", "path", "label")))
                      for i in range(0, len(rows), per_block)]
              for split, rows in splits.items()}
    waiting = {outcome: (split, i) for split in blocks for i, (outcome, _) in enumerate(blocks[split])}
    outcomes = {split: [None] * len(refs) for split, refs in blocks.items()}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        split, i = waiting.pop(ready[0])
        outcomes[split][i] = ray.get(ready[0])
        progress.update(len(outcomes[split][i]["id"]))
    return {split: [(outcome, table) for outcome, (_, table) in zip(outcomes[split], blocks[split])] for split in blocks}


def open_catalog(cfg: TrainConfig) -> Catalog:
    """List --train-data's sources (merged: `merge_sources`), and --eval-data, or hold out --eval-fraction of each
    class; check the classes."""
    listing, sources, relabelled = merge_sources(cfg.train_data)
    shown = " + ".join(cfg.train_data)
    if cfg.eval_data is not None:
        train, held = listing, list_labelled(cfg.eval_data, "--eval-data")
    else:
        train, held = hold_out(listing, cfg.eval_fraction, cfg.seed)
    classes = sorted(set(train["label"]))
    if len(classes) < 2:
        raise DataError(f"--train-data {shown} has {len(classes)} class(es); a classifier needs two or more")
    strangers = sorted(set(held["label"]) - set(classes))
    if strangers:
        raise DataError(f"the evaluation photos have class {strangers[0]!r}, which the training photos lack")
    if held.empty:
        raise DataError(f"no photo is held out for evaluation from --train-data {shown}")
    return Catalog(source=shown, train=train, held=held, classes=classes, seed=cfg.seed, fraction=cfg.eval_fraction,
                   sources=sources, relabelled=relabelled)


# The review page's answer for a photo of none of the classes (review.html's "none of these"): a row with it is left
# out of training, and so is the photo, whatever an earlier source said.
NONE_OF_THESE = "(none of these)"


def merge_sources(sources: tuple[str, ...]) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """The photos of --train-data's sources read in order, a photo named again taking the later label: (path,
    label, size) of each; each source's row count and what it did (`relabelled` photos of earlier sources,
    `added` photos, `left_out` ones marked NONE_OF_THESE); and each relabelled photo (path, from, to). A later
    source's label must be one of the first source's classes: ConfigError naming the row, before any work."""
    merged, counts, changes = None, [], []
    for source in sources:
        rows = list_labelled(source, "--train-data").drop_duplicates("path", keep="last")
        none = rows["label"] == NONE_OF_THESE
        if merged is None:
            merged, classes = rows[~none], sorted(set(rows.loc[~none, "label"]))
            counts.append({"source": source, "rows": len(rows), "relabelled": 0, "added": len(merged),
                           "left_out": int(none.sum())})
            continue
        _check_classes(source, rows[~none], classes)
        before = merged.set_index("path")["label"]
        earlier = rows["path"].map(before)  # the label an earlier source gave, or NaN
        changed = rows[~none & earlier.notna() & (earlier != rows["label"])]
        changes += [{"path": p, "from": before[p], "to": label} for p, label in zip(changed["path"], changed["label"])]
        counts.append({"source": source, "rows": len(rows), "relabelled": len(changed),
                       "added": int((~none & earlier.isna()).sum()), "left_out": int(none.sum())})
        kept = merged[~merged["path"].isin(set(rows["path"]))]
        # A photo named again keeps the size an earlier source listed for it (a listing gives none).
        sizes = rows["path"].map(merged.set_index("path")["size"]).fillna(rows["size"]).astype(np.int64)
        merged = pd.concat([kept, rows[~none].assign(size=sizes[~none])], ignore_index=True)
    return merged.reset_index(drop=True), counts, changes


def _check_classes(source: str, rows: pd.DataFrame, classes: list[str]) -> None:
    strangers = rows[~rows["label"].isin(classes)]
    if not strangers.empty:
        row = strangers.index[0]
        raise ConfigError(
            f"--train-data {source}: row {row + 1} ({strangers.at[row, 'path']}) has class {strangers.at[row, 'label']!r}, "
            f"which is not one of the classes ({', '.join(classes)}) or {NONE_OF_THESE!r}"
        )


def describe_sources(counts: list[dict]) -> str:
    """The sources in one line: "training data: catalog (1,200 photos), corrections.csv (40 rows: 3 relabelled, 2
    added, 1 left out as none of these)"."""
    first, *later = counts
    said = [f"{first['source']} ({first['added']:,} photos"
             + (f", {first['left_out']:,} left out as none of these)" if first["left_out"] else ")")]
    said += [f"{c['source']} ({c['rows']:,} rows: {c['relabelled']:,} relabelled, {c['added']:,} added, "
              f"{c['left_out']:,} left out as none of these)" for c in later]
    return "training data: " + ", ".join(said)
