"""The run report on a tiny made-up run: every figure written, the page references only local files, and its
tables show the run's values."""

import re

import numpy as np
from PIL import Image

from clf import metrics, report
from tests.helpers import html_references

CLASSES = ["a<b", "b", "c"]  # one name that must be escaped in HTML


def test_report_files_and_page(tmp_path):
    labels = np.array([0, 1, 2, 2, 1, 0])
    predictions = np.array([0, 2, 2, 1, 1, 0])
    scores = metrics.compute(labels, predictions, len(CLASSES))
    # Records as the training loop writes them (clf.loop.train_epochs), with the fields the page shows.
    history = [{"epoch": 1, "loss": 0.9123, "accuracy": 0.6012, "images_per_s": 1234.0, "elapsed_s": 10.25},
               {"epoch": 2, "loss": 0.7456, "accuracy": 0.7034, "images_per_s": 1310.0, "elapsed_s": 20.5}]
    wrong = labels != predictions
    mistakes = {
        "images": np.random.default_rng(0).integers(0, 256, (int(wrong.sum()), 28, 28), dtype=np.uint8),
        "id": np.nonzero(wrong)[0], "label": labels[wrong], "prediction": predictions[wrong],
        "confidence": np.array([0.9, 0.8]),
    }
    report.write_run_report(tmp_path, scores, CLASSES, history, mistakes, {"run": "tiny"})

    html = (tmp_path / "report.html").read_text()
    found = html_references(html)
    assert sorted(ref for _, ref in found) == sorted(report.REPORT_FILES.values())
    for _, ref in found:
        with Image.open(tmp_path / ref) as image:
            image.verify()
    assert "a&lt;b" in html and "a<b" not in html
    assert f"{scores.accuracy:.2%}" in html and "tiny" in html
    cells = re.findall(r"<td>([^<]*)</td>", html)
    assert not [c for c in cells if c.lower() in ("nan", "none", "")], cells
    # The epochs table: every history value, as formatted for people.
    for row in (["1", "0.9123", "0.6012", "1,234", "10.2"], ["2", "0.7456", "0.7034", "1,310", "20.5"]):
        assert "".join(f"<td>{c}</td>" for c in row) in html, row
    # The per-class table: class b's precision 1/2 and recall 1/2.
    assert "<td>b</td><td>0.5000</td><td>0.5000</td>" in html
