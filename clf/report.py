"""What a run leaves behind: the terminal tables, metrics.json, predictions.parquet, their provenance, and
the run report (figures and report.html). Tables are pandas frames, formatted once (`formatted`) for the
terminal and the page alike; the page is a Jinja2 template, which escapes what it is given."""

from __future__ import annotations

import json
import platform
from collections import Counter
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from clf.metrics import Metrics  # not imported for real: it brings torchmetrics (see clf.pipeline)

PACKAGES = ("torch", "torchvision", "ray", "torchmetrics", "numpy", "pyarrow")

# How each column of a table is shown, on the terminal and in report.html.
FORMATS = {
    "precision": "{:.4f}", "recall": "{:.4f}", "before: precision": "{:.4f}", "before: recall": "{:.4f}",
    "precision change": "{:+.4f}", "recall change": "{:+.4f}", "loss": "{:.4f}", "train accuracy": "{:.4f}",
    "images/s": "{:,.0f}", "elapsed s": "{:.1f}", "count": "{:,}",
    # jobs/tune.py's trials
    "lr": "{:.4g}", "weight_decay": "{:.2g}", "label_smoothing": "{:.3f}", "width": "{:g}", "val_accuracy": "{:.4f}",
}
TEXT_COLUMNS = ("class", "tag")  # left-aligned on the terminal


def reason_counts(errors) -> Counter:
    """Why files could not be read, counted by the reason's first words (its details in brackets aside)."""
    return Counter(str(e).split(" (")[0] for e in errors if e)


def reasons(errors) -> str:
    """Why files could not be read, counted: "empty file: 1, not an image: 2"."""
    return ", ".join(f"{reason}: {n}" for reason, n in reason_counts(errors).most_common())


def class_frame(metrics: Metrics, classes, previous: dict | None = None) -> pd.DataFrame:
    """Per class: precision and recall; with `previous` (an earlier run's metrics.json), its precision and recall
    beside them (by class name: a class it did not have gets none) and the change of each."""
    frame = pd.DataFrame({"class": list(classes), "precision": metrics.precision, "recall": metrics.recall})
    if previous is None:
        return frame
    before = pd.DataFrame({"class": previous["classes"], "before: precision": previous["precision"],
                           "before: recall": previous["recall"]})
    frame = frame.merge(before, on="class", how="left")
    return frame.assign(**{"precision change": frame["precision"] - frame["before: precision"],
                           "recall change": frame["recall"] - frame["before: recall"]})


def history_frame(history: list[dict]) -> pd.DataFrame:
    columns = {"epoch": "epoch", "loss": "loss", "accuracy": "train accuracy", "images_per_s": "images/s",
               "elapsed_s": "elapsed s"}
    return pd.DataFrame(history, columns=list(columns)).rename(columns=columns)


def formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as the strings a person reads (a missing value as a dash)."""
    return frame.apply(lambda column: column.map(
        lambda value: "–" if _missing(value) else (FORMATS.get(column.name) or "{}").format(value)))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def text_table(frame: pd.DataFrame) -> str:
    shown = formatted(frame)
    left = {c: shown[c].str.len().max() for c in shown.columns if c in TEXT_COLUMNS}
    text = shown.to_string(index=False, justify="left" if left else "right",
                           formatters={c: (lambda width: lambda s: s.ljust(width))(w) for c, w in left.items()})
    return "\n".join(line.rstrip() for line in text.splitlines())


def ending(metrics: Metrics, classes, evaluated: str = "test images") -> str:
    """What a run's console says at its end: the accuracy over what, and the classes it recalls worst (a
    third of them, 1 to 3)."""
    worst = sorted(zip(metrics.recall, range(len(classes))))[:max(1, min(3, len(classes) // 3))]
    return (f"accuracy {metrics.accuracy:.4f} over {metrics.count:,} {evaluated}\n"
            f"weakest classes (recall): " + ", ".join(f"{classes[i]} {recall:.2f}" for recall, i in worst))


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


def read_metrics(location: str, flag: str) -> dict:
    """An earlier run's metrics.json, from its outputs' folder (local or a URI); ConfigError naming `flag` where
    there is none, or it is not one."""
    from clf import storage
    from clf.errors import ConfigError, first_line

    try:
        found = json.loads(storage.read_location(storage.Place.of(location).child("metrics.json")))
        if not {"classes", "precision", "recall", "accuracy"} <= set(found):
            raise ValueError("it holds no per-class metrics")
    except FileNotFoundError:
        raise ConfigError(f"{flag} {location} holds no metrics.json: is it a run's outputs?") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {location}: its metrics.json cannot be read ({first_line(e)})") from None
    return found


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
    """One row per evaluation image: id, path (for photos), label, prediction, confidence."""
    columns = [c for c in ("id", "path", "label", "prediction", "confidence") if c in predictions.columns]
    predictions[columns].to_parquet(path, index=False)


# --- The run report: PNG figures and report.html, for people who will not read JSON ---------------------

REPORT_FILES = {
    "confusion": "confusion_matrix.png",
    "per_class": "per_class.png",
    "history": "history.png",
    "mistakes": "mistakes.png",
}


def write_run_report(folder: Path, metrics: Metrics, classes, history: list[dict], mistakes: dict, facts: dict,
                     evaluated: str = "test images", previous: dict | None = None) -> None:
    """Figures and `report.html` beside metrics.json. `mistakes`: the most confident wrong predictions,
    as arrays `images` (N, 28, 28) uint8, `label`, `prediction`, `confidence`, `id`. `evaluated`: what the
    evaluation rows are, in words (test images, evaluation photos). `previous`: an earlier run's metrics.json
    (--compare), whose per-class figures the table shows beside these."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    classes = list(classes)
    with plt.rc_context({"figure.dpi": 100, "font.size": 9}):
        _confusion_figure(plt, metrics, classes, evaluated).savefig(folder / REPORT_FILES["confusion"], bbox_inches="tight")
        _per_class_figure(plt, metrics, classes).savefig(folder / REPORT_FILES["per_class"], bbox_inches="tight")
        _history_figure(plt, history).savefig(folder / REPORT_FILES["history"], bbox_inches="tight")
        _mistakes_figure(plt, mistakes, classes).savefig(folder / REPORT_FILES["mistakes"], bbox_inches="tight")
        plt.close("all")
    page = PAGE.render(
        metrics=metrics, facts=facts, files=REPORT_FILES,
        per_class=formatted(class_frame(metrics, classes, previous)), epochs=formatted(history_frame(history)),
        evaluated=evaluated,
    )
    (folder / "report.html").write_text(page)


def _confusion_figure(plt, metrics: Metrics, classes, evaluated: str):
    matrix = np.asarray(metrics.confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({metrics.count:,} {evaluated})")
    threshold = matrix.max() / 2
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{matrix[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    return fig


def _per_class_figure(plt, metrics: Metrics, classes):
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(len(classes))
    ax.bar(x - 0.2, metrics.precision, width=0.4, label="precision")
    ax.bar(x + 0.2, metrics.recall, width=0.4, label="recall")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("Precision and recall per class")
    ax.legend(loc="lower right")
    return fig


def _history_figure(plt, history: list[dict]):
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(8, 3))
    epochs = [h["epoch"] for h in history]
    loss_ax.plot(epochs, [h["loss"] for h in history], marker="o")
    loss_ax.set_title("training loss")
    acc_ax.plot(epochs, [h["accuracy"] for h in history], marker="o")
    acc_ax.set_title("training accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
    return fig


def _mistakes_figure(plt, mistakes: dict, classes, columns: int = 8):
    count = len(mistakes["label"])
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, prediction, confidence in zip(
        axes.flat, mistakes["images"], mistakes["label"], mistakes["prediction"], mistakes["confidence"]
    ):
        ax.imshow(image, cmap="gray_r")  # dark on light, as a catalog shows it
        ax.set_title(f"{classes[label]}\n→ {classes[prediction]} {confidence:.0%}", fontsize=7)
    fig.suptitle("Most confident mistakes (true → predicted, confidence)")
    return fig


PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>clf run report: accuracy {{ "%.2f%%" % (metrics.accuracy * 100) }}</title>
<style>
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
img { max-width: 100%; }
</style>
</head>
<body>
<h1>Accuracy {{ "%.2f%%" % (metrics.accuracy * 100) }} over {{ "{:,}".format(metrics.count) }} {{ evaluated }}</h1>
<table>
{% for key, value in facts.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% macro frame_table(frame) %}<table>
<tr>{% for column in frame.columns %}<th>{{ column }}</th>{% endfor %}</tr>
{% for row in frame.itertuples(index=False) %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endmacro %}
{% macro figure(key, alt) %}<figure><img src="{{ files[key] }}" alt="{{ alt }}"></figure>{% endmacro %}
<h2>Per class</h2>
{{ frame_table(per_class) }}
{{ figure("per_class", "precision and recall per class") }}
<h2>Confusion matrix</h2>
{{ figure("confusion", "confusion matrix: true class by row, predicted class by column") }}
<h2>Training</h2>
{{ frame_table(epochs) }}
{{ figure("history", "training loss and accuracy per epoch") }}
<h2>Most confident mistakes</h2>
{{ figure("mistakes", "the " ~ evaluated ~ " the model got wrong with the highest confidence") }}
</body>
</html>
""")
