"""Tag a catalog: photo files in, one row per file out, with the same predictor as test-set evaluation, and the
review page of the photos the model is unsure of.

Pipeline (Ray Data): the list of files -> read and decode each photo into the model's 28x28 domain
(`clf.photos`), catching what is wrong with a file as that row's `error` -> `clf.predictor.Predictor` -> a
thumbnail of each photo to review (`clf.tagging.reading`, one pass) -> rows of tags. Ray Data's own readers
(`read_images`, `read_binary_files`) fail the whole dataset on one unreadable file and drop nothing silently only
by failing; here every file gets its row, a bad one with the reason. The model reaches the predictor actors
through Ray's object store (the driver reads the checkpoint once, from its disk or a URI). The driver collects the
rows (no images: a few short columns, and the thumbnails of the photos to review) batch by batch, checks that each
input has exactly one, writes them in input order into one file, then review.html (`clf.tagging.review`) and
summary.json, in a staging folder that becomes --output when complete: renamed into place on the driver's disk,
or uploaded to a bucket with summary.json last (a Ray Data writer would write from whichever node Ray picks, onto
a disk the user may never see).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from clf import checkpoint as ckpt
from clf import console, plan, predictor, session, storage, tracking
from clf.cluster import cluster_nodes, refuse_unseen
from clf.catalog import read_listing
from clf.config import TagConfig
from clf.errors import ClfError, ConfigError
from clf.infer import predict
from clf.report import provenance, reason_counts, text_table
from clf.plan import InferPlan
from clf.tagging.reading import PhotoTagger, read_for_review
from clf.tagging.review import ReviewPage
from clf.tagging.rows import COLUMNS, TOP_K, tag_columns

# Written last into the output: an output without it is incomplete.
SUMMARY = "summary.json"


# The tags file's columns and types, the same in every batch written.
SCHEMA = pa.schema(
    [("path", pa.string()), ("tag", pa.string()), ("class_id", pa.int64()), ("confidence", pa.float64())]
    + [(f"top{k}{part}", pa.float64() if part else pa.string()) for k in range(1, TOP_K + 1) for part in ("", "_prob")]
    + [("needs_review", pa.bool_()), ("error", pa.string())]
)


@dataclass
class TagResult:
    """What the tags file holds, counted as its rows were written (the driver keeps no rows)."""

    output: str  # a folder on the driver's disk, or a URI
    files: int = 0
    tags: Counter = field(default_factory=Counter)  # tag -> files
    failures: Counter = field(default_factory=Counter)  # why (its first words) -> files
    needs_review: int = 0
    nodes: Counter = field(default_factory=Counter)  # Ray node id -> files its predictor actors tagged
    seconds: float = 0.0  # reading, decoding and tagging, actor start-up included
    first_batch_s: float = 0.0  # until the first batch of rows came back: mostly the actors starting
    first_batch_files: int = 0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def tagged(self) -> int:
        return self.files - self.failed

    def count(self, rows: pd.DataFrame) -> None:
        failed = rows["error"] != ""
        self.files += len(rows)
        self.tags.update(rows.loc[~failed, "tag"])
        self.failures.update(reason_counts(rows["error"]))
        self.needs_review += int(rows["needs_review"].sum())
        self.nodes.update(rows["node"])


def list_inputs(source: str) -> list[str]:
    """The files to tag, as absolute paths or URIs: every file in a folder and below (hidden ones aside), or
    the `path` column of a .parquet or .csv listing (relative entries relative to the listing's folder).
    `source` may itself be a URI (s3://bucket/photos/)."""
    place, kind = storage.locate(source, "--input")
    if kind == pafs.FileType.Directory:
        files = [place.location(path) for path, _ in place.files()]
        if not files:
            raise ConfigError(f"--input {source} holds no files")
        return files
    if kind == pafs.FileType.NotFound:
        raise ConfigError(f"--input {source} does not exist")
    listing = read_listing(place, source, "--input", ConfigError)
    if "path" in listing.columns:
        column = listing["path"]
    elif len(listing.columns) == 1:
        column = listing.iloc[:, 0]
    else:
        raise ConfigError(f"--input {source} has no `path` column (columns: {', '.join(map(str, listing.columns))})")
    if column.empty:
        raise ConfigError(f"--input {source} lists no files")
    return [place.resolve(entry) for entry in column.fillna("").astype(str)]


def to_rows(batch: pd.DataFrame, classes: list[str], review_threshold: float) -> pd.DataFrame:
    """The predictor's output as rows of tags (and the input's `index` and the `node` that tagged it)."""
    columns = tag_columns(np.stack(batch["top_classes"].to_numpy()), np.stack(batch["top_probs"].to_numpy()),
                          batch["error"].to_numpy().astype(str), classes, review_threshold)
    return pd.DataFrame({"index": batch["index"], "path": batch["path"], "node": batch["node"], **columns})


def run(cfg: TagConfig) -> TagResult:
    model = ckpt.read(cfg.checkpoint)  # on the driver, once: fails here, in one line, if it cannot be loaded
    predictor.check(model)
    paths = list_inputs(cfg.input)
    if uri := tracking.tracking_uri(cfg.tracking_uri):
        tracking.connect(uri)  # the tracking store answers, before any work
    with storage.staged_output(cfg.output, last=SUMMARY) as staging:
        session.connect(cfg.ray_logs, cfg.dashboard)
        cluster = cluster_nodes()
        pool = plan.plan_tagging(cfg, cluster, len(paths))
        local = [path for path in (storage.local_path(p) for p in paths if p) if path]
        refuse_unseen(cluster, storage.sample(local), f"--input {cfg.input} (its photos)")
        print(f"tagging {len(paths):,} files from {cfg.input} with {pool.num_actors} predictor actor(s)",
              flush=True)
        result = _tag_all(cfg, pool, paths, model, staging)
        (staging / SUMMARY).write_text(json.dumps(summary_record(result, cfg, model), indent=2) + "\n")
        if uri:
            _track(uri, cfg, model, result, staging / SUMMARY)
    return result


def _tag_all(cfg: TagConfig, pool: InferPlan, paths: list[str], model: ckpt.ModelFiles, staging: Path) -> TagResult:
    """Every file tagged, its rows written into the tags file in input order, the review page beside it."""
    started = time.perf_counter()
    result, review = TagResult(cfg.output), ReviewPage(staging, model.classes)
    parts = staging / ".parts"
    parts.mkdir()
    with console.Progress("tagging", len(paths), "files") as progress:
        tagged = _tag(cfg, pool, paths, model).iter_batches(batch_size=None, batch_format="pandas")
        for predicted in each_input_once(tagged, len(paths)):
            rows = to_rows(predicted, model.classes, cfg.review_threshold)
            if not result.first_batch_files:
                result.first_batch_s, result.first_batch_files = time.perf_counter() - started, len(rows)
            _write_part(parts, rows)
            review.add(rows, predicted["thumbnail"].to_numpy())
            result.count(rows)
            progress.update(len(rows))
    _join_parts(parts, staging / cfg.tags_name, cfg.format)
    review.write()
    result.seconds = time.perf_counter() - started
    return result


def _track(uri: str, cfg: TagConfig, model: ckpt.ModelFiles, result: TagResult, summary: Path) -> None:
    """A tagging run of its own in MLflow: the settings, the counts, summary.json, and the model's run."""
    tags = {"clf.kind": "tagging", "clf.model": model.location}
    if model.description.get("mlflow_run_id"):
        tags["clf.model_run_id"] = model.description["mlflow_run_id"]  # the training run that made the model
    tracker = tracking.Tracker.start(uri, "tag.py", f"tag-{Path(cfg.output.rstrip('/')).name}", tags=tags)
    tracker.params({k: v for k, v in dataclasses.asdict(cfg).items() if k != "tracking_uri"})
    tracker.metrics({"files": result.files, "tagged": result.tagged, "failed": result.failed,
                     "needs_review": result.needs_review, "files_per_s": result.files / max(result.seconds, 1e-9)}
                    | {f"tag/{name}": count for name, count in result.tags.items()})
    tracker.artifact(summary)
    tracker.end()


def _tag(cfg: TagConfig, pool: InferPlan, paths: list[str], model: ckpt.ModelFiles) -> ray.data.Dataset:
    """The Ray Data job: read and convert each file, predict it, and make thumbnails for the review page
    (`clf.tagging.reading`: on CPUs in one actor, with GPUs in CPU tasks beside the GPU actors). Each block is a
    run of consecutive inputs (`index`), and stays whole to the end. The rows of tags are made by the driver as
    blocks arrive: as a task of its own, that cheap step waited for a CPU the actors held, and every block with
    it."""
    listing = pd.DataFrame({"index": np.arange(len(paths)), "path": paths})
    blocks = ray.data.from_pandas([listing.iloc[i:i + cfg.batch_size] for i in range(0, len(listing), cfg.batch_size)])
    if pool.use_gpu:
        read = blocks.map_batches(read_for_review, batch_size=None, batch_format="numpy", num_cpus=1)
        # A batch a block: Ray Data asks GPU actors for a batch size (a block has cfg.batch_size rows, the last fewer).
        return predict(read, model, pool, cfg.batch_size, top_k=TOP_K)
    return blocks.map_batches(
        PhotoTagger, fn_constructor_kwargs={"model": ray.put(model), "review_threshold": cfg.review_threshold},
        batch_size=None, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
        num_cpus=pool.cpus_per_actor,
    )


def each_input_once(tagged: Iterable[pd.DataFrame], count: int) -> Iterator[pd.DataFrame]:
    """The blocks of rows as they come back (in any order), each a run of consecutive inputs (`index`);
    exactly one row per input, checked at the end: never a result that looks complete and is not."""
    runs, done = [], 0
    for rows in tagged:
        index = rows["index"].to_numpy()
        if not np.array_equal(index, np.arange(index[0], index[0] + len(index))):
            raise ClfError(f"tagging returned a batch of rows that is not a run of consecutive inputs (from {index[0]})")
        runs.append((int(index[0]), len(index)))
        done += len(rows)
        yield rows
    expected = 0
    for start, length in sorted(runs):
        if start != expected:
            break
        expected += length
    if expected != count or done != count:
        raise ClfError(f"tagging returned {done:,} rows for {count:,} files")


def _write_part(parts: Path, rows: pd.DataFrame) -> None:
    """A block of rows as a file of its own, named by its first input's index (so that names sort in input
    order); the driver holds one block at a time."""
    table = pa.Table.from_pandas(rows[COLUMNS], schema=SCHEMA, preserve_index=False)
    pq.write_table(table, parts / f"{int(rows['index'].iloc[0]):012d}.parquet")


def _join_parts(parts: Path, path: Path, fmt: str) -> None:
    """The parts, in input order, into the one tags file (Parquet or CSV), a part at a time; then removed."""
    writer = pacsv.CSVWriter if fmt == "csv" else pq.ParquetWriter
    with writer(str(path), SCHEMA) as out:
        for part in sorted(parts.iterdir()):
            out.write_table(pq.read_table(part))
    shutil.rmtree(parts)


def summary_record(result: TagResult, cfg: TagConfig, model: ckpt.ModelFiles) -> dict:
    """summary.json: the counts the console summary shows, the settings, and where the work ran."""
    return {
        "files": result.files,
        "tagged": result.tagged,
        "failed": result.failed,
        "failed_by_reason": dict(result.failures.most_common()),
        "needs_review": result.needs_review,
        "tags": {str(k): int(v) for k, v in result.tags.most_common()},
        "classes": model.classes,
        "seconds": round(result.seconds, 3),
        "first_batch": {"seconds": round(result.first_batch_s, 3), "files": result.first_batch_files},
        "nodes": {node: int(n) for node, n in result.nodes.items()},
        "config": dataclasses.asdict(cfg),
        "provenance": provenance(),
    }


def summary(result: TagResult, review_threshold: float) -> str:
    lines = [
        f"tagged {result.tagged:,} of {result.files:,} files in {result.seconds:.1f} s "
        f"({result.files / result.seconds:,.0f} files/s)"
    ]
    if result.tags:
        counts = pd.Series(result.tags).sort_values(ascending=False, kind="stable")
        lines.append(text_table(counts.rename_axis("tag").reset_index(name="count")))
    lines.append(f"needs review (confidence below {review_threshold:.2f}): {result.needs_review:,}")
    failed = f"failed: {result.failed:,}"
    if result.failed:
        failed += " (" + ", ".join(f"{reason}: {n}" for reason, n in result.failures.most_common()) + ")"
    lines.append(failed)
    nodes = ", ".join(f"{node[:8]} {n:,} files" for node, n in sorted(result.nodes.items()))
    lines.append(f"predictor actors ran on {len(result.nodes)} node(s): {nodes}")
    return "\n".join(lines)
