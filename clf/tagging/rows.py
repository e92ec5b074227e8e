"""A tags file's rows, as tagging writes them and serving answers with them: the columns, and the rows made from
the predictor's k likeliest classes. No torch, no Ray: a Serve replica imports it."""

from __future__ import annotations

import numpy as np
import pandas as pd

TOP_K = 3
COLUMNS = [
    "path", "tag", "class_id", "confidence",
    *(f"top{k}{part}" for k in range(1, TOP_K + 1) for part in ("", "_prob")),
    "needs_review", "error",
]


def tag_columns(top_classes: np.ndarray, top_probs: np.ndarray, errors: np.ndarray, classes: list[str],
                review_threshold: float) -> dict:
    """The columns of a tags file but `path`, from the predictor's k likeliest classes and their probabilities
    for each photo ((N, k) arrays) and each photo's error ("" when it was read): a photo with an error gets no
    tag (missing values), and needs no review. Tagging's rows and serving's answers alike."""
    ok = errors == ""
    names = np.asarray(classes, dtype=object)

    def tag_or_none(ids):
        return pd.array(np.where(ok, names[ids], None), dtype="string")

    def value_or_na(values, dtype):
        return pd.array(np.where(ok, values, None), dtype=dtype)

    columns = {}
    for k in range(TOP_K):
        columns[f"top{k + 1}"] = tag_or_none(top_classes[:, k])
        columns[f"top{k + 1}_prob"] = value_or_na(top_probs[:, k], "Float64")
    columns["tag"], columns["confidence"] = columns["top1"], columns["top1_prob"]
    columns["class_id"] = value_or_na(top_classes[:, 0], "Int64")
    columns["needs_review"] = ok & (top_probs[:, 0] < review_threshold)
    columns["error"] = errors.astype(str)
    return columns
