"""What a run leaves behind: the terminal table, metrics.json, predictions.parquet, and their provenance."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd

from clf.metrics import Metrics

PACKAGES = ("torch", "torchvision", "ray", "torchmetrics", "numpy", "pyarrow")


def table(metrics: Metrics, classes) -> str:
    width = max(len(c) for c in classes)
    lines = [f"{'class':<{width}}  precision  recall", f"{'-' * width}  ---------  ------"]
    for name, p, r in zip(classes, metrics.precision, metrics.recall):
        lines.append(f"{name:<{width}}  {p:9.4f}  {r:6.4f}")
    lines.append(f"accuracy {metrics.accuracy:.4f} over {metrics.count:,} test images")
    return "\n".join(lines)


def history_table(history: list[dict]) -> str:
    """One line per epoch, printed by the driver once training ends (the workers' live lines reach a
    job's log only as far as Ray forwards worker output)."""
    lines = ["epoch  loss    train accuracy  images/s"]
    for h in history:
        lines.append(f"{h['epoch']:>5}  {h['loss']:.4f}  {h['accuracy']:14.4f}  {h['images_per_s']:8,.0f}")
    return "\n".join(lines)


def provenance() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": _git_commit(),
        "host": platform.node(),
    }


def _git_commit() -> str | None:
    """The commit of the code that ran, with '+dirty' for uncommitted changes; None outside a checkout
    (as in a `ray job submit` working dir, which is uploaded without .git)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_metrics(path: Path, metrics: Metrics, classes, extra: dict) -> None:
    body = {
        "accuracy": metrics.accuracy,
        "precision": metrics.precision,
        "recall": metrics.recall,
        "classes": list(classes),
        "count": metrics.count,
        "confusion_matrix": metrics.confusion,
        **extra,
    }
    path.write_text(json.dumps(body, indent=2) + "\n")


def write_predictions(path: Path, predictions: pd.DataFrame) -> None:
    predictions[["id", "label", "prediction", "confidence"]].to_parquet(path, index=False)
