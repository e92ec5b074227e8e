"""Tag a catalog: photo files in, one row per file out, with the same predictor as test-set evaluation.

Pipeline (Ray Data): the list of files -> tasks that read and decode each photo into the model's 28x28
domain (`clf.tagging.photos`), catching what is wrong with a file as that row's `error` -> `clf.infer.Predictor`
over an actor pool -> rows of tags. Ray Data's own readers (`read_images`, `read_binary_files`) fail the
whole dataset on one unreadable file and drop nothing silently only by failing; here every file gets its
row, a bad one with the reason. The model reaches the predictor actors through Ray's object store (the
driver reads the checkpoint once, from its disk or a URI). The driver collects the rows (no images: a few
short columns), checks that each input has exactly one, and writes them itself, as one file, then
summary.json, into a staging folder that becomes --output when complete: renamed into place on the
driver's disk, or uploaded to a bucket with summary.json last (a Ray Data writer would write from whichever
node Ray picks, onto a disk the user may never see).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray.data

from clf import checkpoint as ckpt
from clf import runtime, storage
from clf.catalog import read_listing
from clf.config import TagConfig
from clf.errors import ClfError, ConfigError, first_line
from clf.infer import predict
from clf.report import provenance, reason_counts, reasons, text_table
from clf.runtime import InferPlan
from clf.tagging import photos

TOP_K = 3
COLUMNS = [
    "path", "tag", "class_id", "confidence",
    *(f"top{k}{part}" for k in range(1, TOP_K + 1) for part in ("", "_prob")),
    "needs_review", "error",
]
PROGRESS_EVERY_S = 10.0
# Written last into the output: an output without it is incomplete.
SUMMARY = "summary.json"


@dataclass(frozen=True)
class TagResult:
    rows: pd.DataFrame  # COLUMNS, one row per input file, in input order
    output: str  # a folder on the driver's disk, or a URI
    seconds: float  # reading, decoding and tagging, actor start-up included
    nodes: dict[str, int]  # Ray node id -> files its predictor actors tagged

    @property
    def failed(self) -> int:
        return int((self.rows["error"] != "").sum())

    @property
    def tagged(self) -> int:
        return len(self.rows) - self.failed


def list_inputs(source: str) -> list[str]:
    """The files to tag, as absolute paths or URIs: every file in a folder and below (hidden ones aside), or
    the `path` column of a .parquet or .csv listing (relative entries relative to the listing's folder).
    `source` may itself be a URI (s3://bucket/photos/)."""
    try:
        place = storage.Place.of(source)
        kind = place.kind()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--input {source} cannot be reached ({first_line(e)})") from None
    if kind == pafs.FileType.Directory:
        files = [place.location(info.path) for info in place.files()]
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
    model = ckpt.read(cfg.checkpoint)  # on the driver, once: fails here, in one line, if it cannot be loaded
    ckpt.build(model)
    paths = list_inputs(cfg.input)
    with storage.staged_output(cfg.output, last=SUMMARY) as staging:
        runtime.connect()
        cluster = runtime.cluster_nodes()
        plan = runtime.plan_tagging(cfg, cluster)
        local = [path for path in (storage.local_path(p) for p in paths if p) if path]
        runtime.refuse_unseen(cluster, storage.sample(local), f"--input {cfg.input} (its photos)")
        print(f"tagging {len(paths):,} files from {cfg.input} with {plan.num_actors} predictor actor(s)", flush=True)
        started = time.perf_counter()
        rows = _collect(_tag(cfg, plan, paths, model), len(paths), started)
        result = TagResult(rows[COLUMNS], cfg.output, time.perf_counter() - started,
                           rows["node"].value_counts().to_dict())
        if cfg.format == "csv":
            result.rows.to_csv(staging / cfg.tags_name, index=False)
        else:
            result.rows.to_parquet(staging / cfg.tags_name, index=False)
        (staging / SUMMARY).write_text(json.dumps(summary_record(result, cfg, model), indent=2) + "\n")
    return result


def _tag(cfg: TagConfig, plan: InferPlan, paths: list[str], model: ckpt.ModelFiles) -> ray.data.Dataset:
    """The Ray Data job: read and convert each file (tasks), predict (actors), rows of tags."""
    listing = pd.DataFrame({"index": np.arange(len(paths)), "path": paths})
    blocks = max(1, min(len(paths), -(-len(paths) // cfg.batch_size)))
    prepared = ray.data.from_pandas(listing).repartition(blocks).map_batches(
        photos.read_photos, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=plan.cpus_per_actor or 1
    )
    return predict(prepared, model, plan, cfg.batch_size, top_k=TOP_K).map_batches(
        to_rows, fn_kwargs={"classes": model.classes, "review_threshold": cfg.review_threshold}, batch_format="pandas"
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


def summary_record(result: TagResult, cfg: TagConfig, model: ckpt.ModelFiles) -> dict:
    """summary.json: the counts the console summary shows, the settings, and where the work ran."""
    rows = result.rows
    return {
        "files": len(rows),
        "tagged": result.tagged,
        "failed": result.failed,
        "failed_by_reason": dict(reason_counts(rows["error"]).most_common()),
        "needs_review": int(rows["needs_review"].sum()),
        "tags": {str(k): int(v) for k, v in rows.loc[rows["error"] == "", "tag"].value_counts().items()},
        "classes": model.classes,
        "seconds": round(result.seconds, 3),
        "nodes": {node: int(n) for node, n in result.nodes.items()},
        "config": dataclasses.asdict(cfg),
        "provenance": provenance(),
    }


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
