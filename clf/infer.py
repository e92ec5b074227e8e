"""One predictor, used by test-set evaluation and by catalog tagging alike.

`Predictor` is a callable class for Ray Data's `map_batches`: each actor of the pool builds the model once,
from the checkpoint's files that the driver read and put in Ray's object store (on a cluster whose nodes
share no disk, a path would name a folder on the driver's disk only), and then maps batches of rows. Every
column but `image` passes through untouched, so the row's id and label travel with its prediction whatever
order Ray Data delivers the rows in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray.data
import torch

from clf import console, runtime
from clf.checkpoint import ModelFiles, build
from clf.data import TrainingData, preprocess
from clf.errors import ClfError
from clf.plan import InferPlan


class Predictor:
    def __init__(self, model: ModelFiles | ray.ObjectRef, use_gpu: bool = False, num_threads: int | None = None,
                 top_k: int = 0):
        """`model`: a checkpoint's files, or the object-store reference the driver put them under. `top_k` > 0
        adds the k likeliest classes per row."""
        self.top_k = top_k
        if num_threads:
            runtime.use_cpus(num_threads)  # the CPUs this actor was given
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # Where this actor runs, on every row it predicts (metrics.json's placement).
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.node = context.get_node_id() if context else ""
        self.actor = (context.get_actor_id() or "") if context else ""
        self.model, _ = build(ray.get(model) if isinstance(model, ray.ObjectRef) else model, self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.array(batch.pop("image"), dtype=np.uint8)).to(self.device)
        probs = torch.softmax(self.model(preprocess(images)), dim=1)
        top_probs, top_classes = probs.topk(max(1, self.top_k), dim=1)
        batch["prediction"] = top_classes[:, 0].cpu().numpy().astype(np.int64)
        batch["confidence"] = top_probs[:, 0].cpu().numpy().astype(np.float32)
        batch["node"] = np.full(len(images), self.node, dtype=object)
        batch["actor"] = np.full(len(images), self.actor, dtype=object)
        if self.top_k:
            batch["top_classes"] = top_classes.cpu().numpy().astype(np.int64)  # (N, top_k), likeliest first
            batch["top_probs"] = top_probs.cpu().numpy().astype(np.float32)
        return batch


def predict(dataset: ray.data.Dataset, model: ModelFiles, plan: InferPlan, batch_size: int,
            top_k: int = 0) -> ray.data.Dataset:
    """The dataset's rows with `image` replaced by `prediction` (class index) and `confidence` (and with
    `top_k`, `top_classes` and `top_probs`), and `node` and `actor`, the Ray ids of where each row was
    predicted; mapped by `plan.num_actors` predictor actors."""
    return dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={
            # Put once; each actor fetches it from its node's object store. (Ray Data keeps the constructor
            # arguments inside the function it pickles, so the reference arrives as it is, unresolved.)
            "model": ray.put(model),
            "use_gpu": plan.use_gpu,
            "num_threads": int(plan.cpus_per_actor) or None,
            "top_k": top_k,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=1 if plan.use_gpu else 0,
    )


def evaluate(model: ModelFiles, data: TrainingData, plan: InferPlan, batch_size: int) -> pd.DataFrame:
    """Tag every evaluation image with the Ray Data predictor; rows (id, label, prediction, confidence, and
    path for photos) in id order."""
    parts = []
    with console.Progress("evaluating", len(data.eval_rows), data.unit) as progress:
        for part in predict(data.eval_dataset(), model, plan, batch_size).iter_batches(batch_size=None,
                                                                                       batch_format="pandas"):
            parts.append(part)
            progress.update(len(part))
    return check_complete(pd.concat(parts, ignore_index=True), data.eval_rows)


def placement(rows: pd.DataFrame) -> list[dict]:
    """Which actor predicted how many rows, on which node."""
    counts = rows.groupby(["actor", "node"]).size().reset_index(name="rows")
    return counts.to_dict(orient="records")


def check_complete(rows: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    """The rows in id order, once it is sure that every expected row (id, label) came back exactly once, with
    the label it was read with: never a partial result."""
    rows = rows.sort_values("id", ignore_index=True)
    ids = np.sort(expected["id"].to_numpy())
    if len(rows) != len(ids) or not np.array_equal(rows["id"].to_numpy(), ids):
        raise ClfError(f"inference returned {len(rows)} rows for {len(ids)} images")
    if not np.array_equal(rows["label"].to_numpy(), expected.set_index("id").loc[ids, "label"].to_numpy()):
        raise ClfError("inference returned labels that differ from the ones read")
    return rows
