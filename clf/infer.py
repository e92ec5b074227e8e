"""Inference over a Ray Dataset: the predictor (`clf.predictor.Predictor`) mapped over an actor pool, for
test-set evaluation and catalog tagging alike; evaluation's rows checked complete before they are counted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray.data

from clf import console
from clf.checkpoint import ModelFiles
from clf.data import TrainingData
from clf.errors import ClfError
from clf.plan import InferPlan
from clf.predictor import Predictor


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
