"""The run report on a tiny made-up run: every figure written, the page references only local files."""


import numpy as np
from PIL import Image

from clf import metrics, report
from tests.helpers import html_references

CLASSES = ["a<b", "b", "c"]  # one name that must be escaped in HTML


def test_report_files_and_page(tmp_path):
    labels = np.array([0, 1, 2, 2, 1, 0])
    predictions = np.array([0, 2, 2, 1, 1, 0])
    scores = metrics.compute(labels, predictions, len(CLASSES))
    history = [{"epoch": 1, "loss": 0.9, "accuracy": 0.6, "images_per_s": 100.0},
               {"epoch": 2, "loss": 0.7, "accuracy": 0.7, "images_per_s": 110.0}]
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
