"""Tagging photo files: the photo conversion on tiny images, the listing of inputs, and jobs/tag.py on a
folder of catalog-like photos rendered from real Fashion-MNIST test images, with broken files among them."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.catalog import render, write_broken, write_catalog
from clf.config import TagConfig
from clf.errors import ConfigError
from clf import data, photos
from clf.errors import ClfError
from clf.tagging.pipeline import COLUMNS, each_input_once, list_inputs
from tests.console_lines import check_only_ours
from tests.helpers import ROOT

TAG = str(ROOT / "jobs" / "tag.py")


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def square_item(side: int = 28) -> np.ndarray:
    """A light-on-dark 28x28 image: a filled 14x20 rectangle, wider than tall."""
    image = np.zeros((side, side), dtype=np.uint8)
    image[7:21, 4:24] = 200
    return image


def test_a_rendered_photo_comes_back_as_the_image_it_was_made_from():
    original = square_item()
    photo, _ = render(original, np.random.default_rng(0))
    back = photos.load(encoded(photo))
    assert back.shape == (28, 28) and back.dtype == np.uint8
    # The item fills the longest side, centred, light on black, as in Fashion-MNIST.
    rows, cols = np.nonzero(back > 100)
    assert cols.min() <= 1 and cols.max() >= 26
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1.5
    assert back[0, 0] == 0 and back[14, 14] > 150


def test_transparent_cutouts_and_grayscale_photos_are_handled():
    rgba = np.zeros((120, 90, 4), dtype=np.uint8)
    rgba[30:90, 20:70] = (20, 20, 20, 255)  # an opaque dark item on a transparent background
    back = photos.load(encoded(Image.fromarray(rgba, "RGBA")))
    assert back.max() > 200 and back[0, 0] == 0
    gray = np.full((100, 100), 245, dtype=np.uint8)
    gray[10:90, 40:60] = 30
    assert photos.load(encoded(Image.fromarray(gray, "L"))).max() > 200


@pytest.mark.parametrize(
    "data, complaint",
    [
        (b"", "empty file"),
        (b"this is not a picture\n", "not an image"),
        (encoded(Image.new("RGB", (64, 64), (240, 240, 240)), "JPEG")[:100], "truncated"),
        (encoded(Image.new("RGB", (64, 64), (240, 238, 230))), "no item found"),
        (encoded(Image.new("RGB", (64, 64), (10, 10, 10))), "dark background"),
    ],
)
def test_files_that_cannot_be_tagged_say_why(data, complaint):
    with pytest.raises(photos.PhotoError, match=complaint):
        photos.load(data)


def test_a_photo_over_the_pixel_limit_is_too_large_not_corrupt(monkeypatch):
    monkeypatch.setattr(photos, "MAX_PIXELS", 100)
    with pytest.raises(photos.PhotoError, match=r"^image too large \(64x64 pixels\)$"):
        photos.load(encoded(Image.new("RGB", (64, 64), (240, 240, 240))))


def test_a_folder_lists_every_file_below_it_but_hidden_ones(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.PNG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")  # not a photo, but an input: it gets a row with its error
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.jpg").write_bytes(b"x")
    names = [p.split("/")[-1] for p in list_inputs(str(tmp_path))]
    assert sorted(names) == ["a.jpg", "b.PNG", "notes.txt"]


def test_listings_resolve_relative_paths_against_their_folder(tmp_path):
    pd.DataFrame({"path": ["x.jpg", "/abs/y.png"], "sku": ["1", "2"]}).to_csv(tmp_path / "list.csv", index=False)
    assert list_inputs(str(tmp_path / "list.csv")) == [str(tmp_path / "x.jpg"), "/abs/y.png"]
    pd.DataFrame({"file": ["z.webp"]}).to_parquet(tmp_path / "list.parquet")  # one column: that is the path
    assert list_inputs(str(tmp_path / "list.parquet")) == [str(tmp_path / "z.webp")]


def missing(folder):
    return folder / "missing"


def empty_folder(folder):
    return folder


def text_listing(folder):
    (folder / "list.txt").write_text("a.jpg\n")
    return folder / "list.txt"


def no_path_column(folder):
    pd.DataFrame({"a": ["1"], "b": ["2"]}).to_csv(folder / "list.csv", index=False)
    return folder / "list.csv"


def corrupt_listing(folder):
    (folder / "list.parquet").write_text("not parquet")
    return folder / "list.parquet"


@pytest.mark.parametrize(
    "make_input, complaint",
    [
        (missing, "does not exist"),
        (empty_folder, "holds no files"),
        (text_listing, "neither a folder nor"),
        (no_path_column, "no `path` column"),
        (corrupt_listing, "cannot be read"),
    ],
)
def test_bad_inputs_are_config_errors(tmp_path, make_input, complaint):
    with pytest.raises(ConfigError, match=complaint):
        list_inputs(str(make_input(tmp_path)))


def test_tag_config_checks_its_values():
    with pytest.raises(ConfigError, match="review_threshold"):
        TagConfig(checkpoint="c", input="i", output="o", review_threshold=1.5)
    with pytest.raises(ConfigError, match="format"):
        TagConfig(checkpoint="c", input="i", output="o", format="xlsx")


def test_bad_flags_and_a_missing_checkpoint_are_one_line_errors(tmp_path):
    usage = subprocess.run([sys.executable, TAG, "--checkpoint", "c", "--input", "i", "--output", "o",
                            "--review-threshold", "2"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--review-threshold: must be between 0 and 1" in usage.stderr
    missing = subprocess.run([sys.executable, TAG, "--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path),
                              "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "checkpoint folder" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "out").exists()


def test_rows_are_passed_on_as_they_come_and_a_missing_or_doubled_input_is_refused_at_the_end():
    def blocks(*runs):
        return [pd.DataFrame({"index": range(start, start + length)}) for start, length in runs]

    assert [len(b) for b in each_input_once(blocks((5, 5), (0, 5)), 10)] == [5, 5]  # any order
    for runs, count in ((((0, 5),), 10), (((0, 5), (0, 5)), 10), (((0, 5), (6, 4)), 10), (((0, 5), (5, 5)), 9)):
        passed = []
        with pytest.raises(ClfError, match=r"tagging returned [\d,]+ rows for [\d,]+ files"):
            for block in each_input_once(blocks(*runs), count):
                passed.append(block)  # every block is handed on before the end's check refuses the whole
        assert len(passed) == len(runs)
    with pytest.raises(ClfError, match="not a run of consecutive inputs"):
        list(each_input_once([pd.DataFrame({"index": [0, 2, 3]})], 3))


# --- The real thing: a trained model, real images rendered as photos, real files, the real CLI ---------

PHOTOS = 500


@pytest.fixture(scope="module")
def shop(real_data, tmp_path_factory):
    """A folder of PHOTOS catalog-like photos of random test images, plus broken files in a subfolder."""
    folder = tmp_path_factory.mktemp("shop")
    ids = np.random.default_rng(11).permutation(len(real_data.test.labels))[:PHOTOS]
    paths = write_catalog(folder / "photos", real_data.test.images[ids], seed=3)
    broken = write_broken(folder / "photos" / "broken")
    return folder, ids, paths, broken


def run_tag(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, TAG, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_tags_a_folder_of_photos_accounting_for_every_file(shop, one_epoch, real_data, tmp_path):
    folder, ids, paths, broken = shop
    out = tmp_path / "tags"
    # A progress line every 0.2 s where the output is not a terminal (as here), not every 10 s.
    # Tracked to the store the model's training run is in (MLflow lines would show among the console's).
    proc = run_tag("--checkpoint", str(one_epoch.output / "checkpoint"), "--input", str(folder / "photos"),
                   "--output", str(out), "--tracking-uri", one_epoch.tracking_uri, env={"CLF_PROGRESS_EVERY_S": "0.2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["review", "review.html", "summary.json", "tags.parquet"]
    # Only our lines: the plan, progress (two blocks of 256 at least), the summary with its 10-row table.
    lines = check_only_ours(proc.stdout + proc.stderr, at_most=30)
    assert any(line.startswith("tagging: ") for line in lines), lines
    rows = pd.read_parquet(out / "tags.parquet")
    assert list(rows.columns) == COLUMNS

    # Every file exactly once: the photos and the broken ones.
    expected = {str(p.resolve()) for p in paths} | {str((folder / "photos" / "broken" / n).resolve()) for n in broken}
    assert sorted(rows["path"]) == sorted(expected)

    failed = rows[rows["error"] != ""]
    failed = failed.set_index(failed["path"].str.rsplit("/", n=1).str[-1])
    assert sorted(failed.index) == sorted(broken)
    for name, word in broken.items():
        assert word in failed.loc[name, "error"]
        assert pd.isna(failed.loc[name, "tag"]) and not failed.loc[name, "needs_review"]

    tagged = rows[rows["error"] == ""].copy()
    tagged["i"] = tagged["path"].str.extract(r"photo-(\d+)\.")[0].astype(int)
    truth = real_data.test.labels[ids[tagged["i"]]]
    photo_accuracy = np.mean(tagged["class_id"].to_numpy() == truth)
    # The model's accuracy on the same images as they are in the test set.
    predictions = pd.read_parquet(one_epoch.output / "predictions.parquet").set_index("id").sort_index()["prediction"]
    model_accuracy = np.mean(predictions.to_numpy()[ids] == real_data.test.labels[ids])
    print(f"accuracy on the photos {photo_accuracy:.3f}, on the same images in the test set {model_accuracy:.3f}")
    assert abs(photo_accuracy - model_accuracy) <= 0.02, (photo_accuracy, model_accuracy)

    # Top 3 ordered, the first is the tag; review flags follow the threshold.
    assert (tagged["tag"] == tagged["top1"]).all() and (tagged["confidence"] == tagged["top1_prob"]).all()
    assert (tagged["top1_prob"] >= tagged["top2_prob"]).all() and (tagged["top2_prob"] >= tagged["top3_prob"]).all()
    assert (tagged["needs_review"] == (tagged["confidence"] < 0.6)).all()

    # The review page's rows: each photo to review, least confident first, with its thumbnail (made in the same
    # pass), and the files that could not be read, apart (tests/test_review.py opens the page in a browser).
    review = json.loads((out / "review" / "rows.js").read_text().removeprefix("window.CLF_REVIEW = ").rstrip(";\n"))
    unsure = tagged[tagged["needs_review"]].sort_values(["confidence", "path"])
    assert [row[1] for row in review["rows"]] == unsure["path"].tolist() and review["classes"] == list(data.CLASSES)
    assert [row[3] for row in review["rows"]] == pytest.approx(unsure["confidence"].tolist(), abs=1e-6)
    assert [row[4] for row in review["rows"]] == unsure["top1"].tolist()
    assert sorted(p.name for p in (out / "review").iterdir()) == sorted([row[2] for row in review["rows"]] + ["rows.js"])
    with Image.open(out / "review" / review["rows"][0][2]) as thumbnail:
        assert max(thumbnail.size) == photos.THUMBNAIL_SIDE
    assert sorted(Path(path).name for path, _ in review["errors"]) == sorted(broken)

    # The summary.
    assert f"tagged {PHOTOS} of {PHOTOS + len(broken)} files" in proc.stdout
    assert f"needs review (confidence below 0.60): {int(rows['needs_review'].sum())}" in proc.stdout
    assert f"failed: {len(broken)} (" in proc.stdout
    assert re.search(r"files/s\)", proc.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == PHOTOS + len(broken) and summary["failed"] == len(broken)
    assert summary["tags"] == rows.loc[rows["error"] == "", "tag"].value_counts().to_dict()
    assert sum(summary["failed_by_reason"].values()) == len(broken) and summary["config"]["input"] == str(folder / "photos")

    # An MLflow run of its own: the counts, summary.json, and the training run that made its model.
    client = MlflowClient(one_epoch.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("clf").experiment_id],
                               filter_string="tags.`clf.kind` = 'tagging'")
    model_run = json.loads((one_epoch.output / "checkpoint" / "model.json").read_text())["mlflow_run_id"]
    assert run.data.tags["clf.model_run_id"] == model_run
    assert client.get_run(model_run).data.tags["clf.kind"] == "training"
    assert {k: run.data.metrics[k] for k in ("files", "tagged", "failed", "needs_review")} == {
        "files": summary["files"], "tagged": summary["tagged"], "failed": summary["failed"],
        "needs_review": summary["needs_review"]}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]


@pytest.mark.slow
def test_a_csv_listing_tagged_into_csv_with_a_missing_file(shop, one_epoch, tmp_path):
    folder, _, paths, _ = shop
    listing = tmp_path / "listing.csv"
    entries = [str(p) for p in paths[:20]] + [str(folder / "photos" / "gone.jpg")]
    pd.DataFrame({"sku": range(len(entries)), "path": entries}).to_csv(listing, index=False)
    out = tmp_path / "tags"
    proc = run_tag("--checkpoint", str(one_epoch.output / "checkpoint"), "--input", str(listing),
                   "--output", str(out), "--format", "csv", "--review-threshold", "0.9", "--num-actors", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.read_csv(out / "tags.csv", keep_default_na=False)
    assert list(rows.columns) == COLUMNS
    assert sorted(rows["path"]) == sorted(entries)
    gone = rows[rows["path"].str.endswith("gone.jpg")]
    assert gone["error"].tolist() == ["file not found"]
    assert "needs review (confidence below 0.90)" in proc.stdout

    again = run_tag("--checkpoint", str(one_epoch.output / "checkpoint"), "--input", str(listing), "--output", str(out))
    assert again.returncode == 2 and "exists already" in again.stderr  # never overwrites earlier tags


def test_the_photo_conversion_imports_neither_torch_nor_pandas():
    # Every decode task imports it: torch alone takes seconds to import and hundreds of MB.
    code = "import sys, clf.photos; print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_large_photo_decodes_at_a_scale_that_keeps_the_28_pixel_result():
    original = square_item()
    photo, _ = render(original, np.random.default_rng(1), scales=(30, 31), kinds=("jpg",))  # ~1100 px
    data = encoded(photo, "JPEG")
    assert max(photos.decode(data).size) < max(photo.size) / 2 and min(photos.decode(data).size) >= 224 // 2
    scaled, whole = photos.load(data), photos.load(data, side=None)
    assert np.abs(scaled.astype(int) - whole.astype(int)).mean() < 8  # the same item, the same place
    rows, cols = np.nonzero(scaled > 100)
    assert cols.min() <= 1 and cols.max() >= 26
