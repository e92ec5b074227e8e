"""Tag a catalog: photo files in, one row per file out, with the same predictor as test-set evaluation.

Pipeline (Ray Data): the list of files -> tasks that read and decode each photo into the model's 28x28
domain (`clf.tagging.photos`), catching what is wrong with a file as that row's `error` -> `clf.infer.Predictor`
over an actor pool -> rows of tags. Ray Data's own readers (`read_images`, `read_binary_files`) fail the
whole dataset on one unreadable file and drop nothing silently only by failing; here every file gets its
row, a bad one with the reason. The driver collects the rows (no images: a few short columns), checks
that each input has exactly one, and writes them itself, as one file, into a staging folder that is
renamed into place when complete: the driver's disk is the only one the user is sure to reach (a Ray Data
writer would write from whichever node Ray picks).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray.data

from clf import checkpoint as ckpt
from clf import runtime
from clf.config import TagConfig
from clf.errors import ClfError, ConfigError, first_line
from clf.infer import predict
from clf.report import reasons, text_table
from clf.runtime import InferPlan
from clf.tagging import photos

TOP_K = 3
COLUMNS = [
    "path", "tag", "class_id", "confidence",
    *(f"top{k}{part}" for k in range(1, TOP_K + 1) for part in ("", "_prob")),
    "needs_review", "error",
]
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class TagResult:
    rows: pd.DataFrame  # COLUMNS, one row per input file, in input order
    output: Path
    seconds: float  # reading, decoding and tagging, actor start-up included
    nodes: dict[str, int]  # Ray node id -> files its predictor actors tagged

    @property
    def failed(self) -> int:
        return int((self.rows["error"] != "").sum())

    @property
    def tagged(self) -> int:
        return len(self.rows) - self.failed


def list_inputs(source: str) -> list[str]:
    """Absolute paths of the files to tag: every file in a folder and below (hidden ones aside), or the
    `path` column of a .parquet or .csv listing (relative to the listing's folder)."""
    path = Path(source)
    if path.is_dir():
        files = [
            str(p.resolve())
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise ConfigError(f"--input {source} holds no files")
        return files
    if not path.exists():
        raise ConfigError(f"--input {source} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            listing = pd.read_parquet(path)
        elif suffix == ".csv":
            listing = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise ConfigError(f"--input {source} is neither a folder nor a .parquet or .csv listing")
    except (ValueError, OSError) as e:  # pandas' and pyarrow's errors for an unreadable listing
        raise ConfigError(f"--input {source} cannot be read as a listing ({first_line(e)})") from None
    if "path" in listing.columns:
        column = listing["path"]
    elif len(listing.columns) == 1:
        column = listing.iloc[:, 0]
    else:
        raise ConfigError(f"--input {source} has no `path` column (columns: {', '.join(map(str, listing.columns))})")
    if column.empty:
        raise ConfigError(f"--input {source} lists no files")
    base = path.resolve().parent
    # An empty entry stays empty: its row says so rather than pointing at the listing's folder.
    return [str(base / p) if p and not os.path.isabs(p) else str(p) for p in column.fillna("").astype(str)]


def to_rows(batch: pd.DataFrame, classes: list[str], review_threshold: float) -> pd.DataFrame:
    """The predictor's output as tag rows; a row with an error gets no tag."""
    ok = (batch["error"] == "").to_numpy()
    top_classes = np.stack(batch["top_classes"].to_numpy())
    top_probs = np.stack(batch["top_probs"].to_numpy())
    names = np.asarray(classes, dtype=object)

    def tag_or_none(ids):
        return pd.array(np.where(ok, names[ids], None), dtype="string")

    def value_or_na(values, dtype):
        return pd.array(np.where(ok, values, None), dtype=dtype)

    rows = {"index": batch["index"], "path": batch["path"], "node": batch["node"]}
    for k in range(TOP_K):
        rows[f"top{k + 1}"] = tag_or_none(top_classes[:, k])
        rows[f"top{k + 1}_prob"] = value_or_na(top_probs[:, k], "Float64")
    rows["tag"], rows["confidence"] = rows["top1"], rows["top1_prob"]
    rows["class_id"] = value_or_na(top_classes[:, 0], "Int64")
    rows["needs_review"] = ok & (top_probs[:, 0] < review_threshold)
    rows["error"] = batch["error"].astype(str)
    return pd.DataFrame(rows)


def run(cfg: TagConfig) -> TagResult:
    _, classes = ckpt.load_model(cfg.checkpoint)  # fail now, in one line, on one the actors could not load
    paths = list_inputs(cfg.input)
    output = Path(cfg.output)
    with runtime.staged_output(output) as staging:
        runtime.connect()
        plan = runtime.plan_tagging(cfg, runtime.cluster_nodes())
        print(f"tagging {len(paths):,} files from {cfg.input} with {plan.num_actors} predictor actor(s)", flush=True)
        started = time.perf_counter()
        rows = _collect(_tag(cfg, plan, paths, classes), len(paths), started)
        seconds = time.perf_counter() - started
        tags = rows[COLUMNS]
        if cfg.format == "csv":
            tags.to_csv(staging / cfg.tags_name, index=False)
        else:
            tags.to_parquet(staging / cfg.tags_name, index=False)
    return TagResult(tags, output, seconds, rows["node"].value_counts().to_dict())


def _tag(cfg: TagConfig, plan: InferPlan, paths: list[str], classes: list[str]) -> ray.data.Dataset:
    """The Ray Data job: read and convert each file (tasks), predict (actors), rows of tags."""
    listing = pd.DataFrame({"index": np.arange(len(paths)), "path": paths})
    blocks = max(1, min(len(paths), -(-len(paths) // cfg.batch_size)))
    prepared = ray.data.from_pandas(listing).repartition(blocks).map_batches(
        photos.read_photos, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=plan.cpus_per_actor or 1
    )
    return predict(prepared, os.path.abspath(cfg.checkpoint), plan, cfg.batch_size, top_k=TOP_K).map_batches(
        to_rows, fn_kwargs={"classes": classes, "review_threshold": cfg.review_threshold}, batch_format="pandas"
    )


def _collect(tagged: ray.data.Dataset, count: int, started: float) -> pd.DataFrame:
    """The rows on the driver, in input order, with a progress line now and then; exactly one per input."""
    parts, done, last_report = [], 0, time.perf_counter()
    for part in tagged.iter_batches(batch_size=None, batch_format="pandas"):
        parts.append(part)
        done += len(part)
        if time.perf_counter() - last_report > PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            print(f"  {done:,} of {count:,} files ({done / (last_report - started):,.0f} files/s)", flush=True)
    rows = pd.concat(parts, ignore_index=True).sort_values("index", ignore_index=True)
    # Every input exactly once: never a result that looks complete and is not.
    if len(rows) != count or not np.array_equal(rows["index"].to_numpy(), np.arange(count)):
        raise ClfError(f"tagging returned {len(rows)} rows for {count} files")
    return rows


def summary(result: TagResult, review_threshold: float) -> str:
    rows = result.rows
    lines = [
        f"tagged {result.tagged:,} of {len(rows):,} files in {result.seconds:.1f} s "
        f"({len(rows) / result.seconds:,.0f} files/s)"
    ]
    counts = rows.loc[rows["error"] == "", "tag"].value_counts()
    if len(counts):
        lines.append(text_table(counts.rename_axis("tag").reset_index(name="count")))
    lines.append(f"needs review (confidence below {review_threshold:.2f}): {int(rows['needs_review'].sum()):,}")
    failed = f"failed: {result.failed:,}"
    if result.failed:
        failed += f" ({reasons(rows['error'])})"
    lines.append(failed)
    nodes = ", ".join(f"{node[:8]} {n:,} files" for node, n in sorted(result.nodes.items()))
    lines.append(f"predictor actors ran on {len(result.nodes)} node(s): {nodes}")
    return "\n".join(lines)
