"""Accuracy and per-class precision and recall, reduced from (label, prediction) pairs by torchmetrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_precision,
    multiclass_recall,
)


@dataclass(frozen=True)
class Metrics:
    accuracy: float  # fraction of all images classified correctly (micro average)
    precision: list[float]  # per class, in class-index order; 0.0 for a class never predicted
    recall: list[float]  # per class, in class-index order
    confusion: list[list[int]]  # [true class][predicted class] counts
    count: int  # images counted


def compute(labels, predictions, num_classes: int) -> Metrics:
    target = torch.from_numpy(np.array(labels, dtype=np.int64))
    preds = torch.from_numpy(np.array(predictions, dtype=np.int64))
    if target.shape != preds.shape or target.ndim != 1:
        raise ValueError(f"labels {tuple(target.shape)} and predictions {tuple(preds.shape)} must be 1-D and equal")
    if len(target) == 0:
        raise ValueError("no predictions to count")
    kw = {"num_classes": num_classes, "validate_args": True}
    return Metrics(
        accuracy=float(multiclass_accuracy(preds, target, average="micro", **kw)),
        precision=multiclass_precision(preds, target, average=None, **kw).tolist(),
        recall=multiclass_recall(preds, target, average=None, **kw).tolist(),
        confusion=multiclass_confusion_matrix(preds, target, **kw).tolist(),
        count=len(target),
    )
