"""Training on a store's own catalog: labelled photos (rendered from Fashion-MNIST test images, four
well-separated classes under the store's own names, broken files among them) listed, split, read once by Ray
tasks and dealt to the training workers; evaluated and tagged with the store's class names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clf import catalog, data
from clf.config import TrainConfig
from clf.errors import ConfigError
from clf.plan import TrainPlan
from clf.trainer import fit
from tests.catalog import PER_CLASS, STORE_CLASSES
from tests.console_lines import EPOCH, check_only_ours
from tests.helpers import ROOT

TRAIN = str(ROOT / "jobs" / "train.py")
TAG = str(ROOT / "jobs" / "tag.py")


def listing(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(pairs, columns=["path", "label"])


# --- Listing and splitting, no Ray -----------------------------------------------------------------------


def test_the_split_depends_on_the_files_and_the_seed_alone():
    files = listing([(f"/c/{label}/{i:03d}.jpg", label) for label in ("a", "b", "c") for i in range(40)])
    train, held = catalog.hold_out(files, 0.1, seed=0)
    assert held.groupby("label").size().to_dict() == {"a": 4, "b": 4, "c": 4}  # stratified
    assert not set(train["path"]) & set(held["path"]) and len(train) + len(held) == 120
    shuffled = files.sample(frac=1, random_state=5)
    assert set(catalog.hold_out(shuffled, 0.1, seed=0)[1]["path"]) == set(held["path"])  # any order
    assert set(catalog.hold_out(files, 0.1, seed=1)[1]["path"]) != set(held["path"])  # another seed


def test_later_sources_relabel_add_and_leave_out_photos(tmp_path):
    for label in ("bags", "shoes"):
        (tmp_path / "shop" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "shop" / label / f"{i}.jpg").write_bytes(b"x")
    shop = tmp_path / "shop"
    pd.DataFrame({"path": [str(shop / "bags" / "0.jpg"), str(shop / "bags" / "1.jpg"), str(shop / "shoes" / "0.jpg"),
                           str(tmp_path / "new.jpg"), str(shop / "shoes" / "2.jpg")],
                  "label": ["shoes", "bags", catalog.NONE_OF_THESE, "bags", "shoes"]}).to_csv(tmp_path / "fix.csv", index=False)
    merged, counts, changes = catalog.merge_sources((str(shop), str(tmp_path / "fix.csv")))
    labels = dict(zip(merged["path"], merged["label"]))
    assert labels[str(shop / "bags" / "0.jpg")] == "shoes"  # the later label
    assert str(shop / "shoes" / "0.jpg") not in labels  # none of these: left out, whatever the catalog said
    assert labels[str(tmp_path / "new.jpg")] == "bags" and len(merged) == 6  # 6 - 1 left out + 1 added
    assert counts == [{"source": str(shop), "rows": 6, "relabelled": 0, "added": 6, "left_out": 0},
                      {"source": str(tmp_path / "fix.csv"), "rows": 5, "relabelled": 1, "added": 1, "left_out": 1}]
    assert changes == [{"path": str(shop / "bags" / "0.jpg"), "from": "bags", "to": "shoes"}]
    assert catalog.describe_sources(counts) == (
        f"training data: {shop} (6 photos), {tmp_path / 'fix.csv'} (5 rows: 1 relabelled, 1 added, 1 left out as "
        "none of these)")
    # A class the catalog does not have: one line naming the row and the class, before any photo is read.
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["bags", "hats"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConfigError, match=r"bad.csv: row 2 \(.*b.jpg\) has class 'hats', which is not one of the "
                                          r"classes \(bags, shoes\)"):
        catalog.merge_sources((str(shop), str(tmp_path / "bad.csv")))


def test_a_folder_and_a_listing_list_the_same_photos(tmp_path):
    for name in ("bags", "shoes"):
        (tmp_path / "shop" / name / "sub").mkdir(parents=True)
        (tmp_path / "shop" / name / "a.jpg").write_bytes(b"x")
        (tmp_path / "shop" / name / "sub" / "b.png").write_bytes(b"x")
        (tmp_path / "shop" / name / ".DS_Store").write_bytes(b"x")
    pd.DataFrame({"path": ["shop/bags/a.jpg", "shop/bags/sub/b.png", "shop/shoes/a.jpg", "shop/shoes/sub/b.png"],
                  "label": ["bags", "bags", "shoes", "shoes"]}).to_parquet(tmp_path / "list.parquet")
    folder = catalog.list_labelled(str(tmp_path / "shop"), "--train-data")
    listed = catalog.list_labelled(str(tmp_path / "list.parquet"), "--train-data")
    columns = ["path", "label"]
    assert sorted(map(tuple, folder[columns].to_numpy())) == sorted(map(tuple, listed[columns].to_numpy()))
    assert len(folder) == 4
    # No size asked for file by file (a stat each, on a local disk; the photos' digest takes the bytes read).
    assert folder["size"].tolist() == [-1, -1, -1, -1] and listed["size"].tolist() == [-1, -1, -1, -1]


def test_uris_are_listed_and_read_like_paths(tmp_path, real_data):
    # file:// stands in for the URIs pyarrow reads (s3://, gs://): the same code lists and reads them.
    from tests.catalog import write_catalog
    from clf import photos

    write_catalog(tmp_path / "shop" / "bags", real_data.test.images[:2])
    write_catalog(tmp_path / "shop" / "shoes", real_data.test.images[2:4])
    by_path = catalog.list_labelled(str(tmp_path / "shop"), "--train-data")
    by_uri = catalog.list_labelled(f"file://{tmp_path / 'shop'}", "--train-data")
    assert by_uri["path"].tolist() == ["file://" + p for p in by_path["path"]]
    assert by_uri[["label", "size"]].equals(by_path[["label", "size"]])
    batch = photos.read_photos({"path": np.array(by_uri["path"].tolist() + [f"file://{tmp_path}/gone.jpg"], dtype=object)})
    assert list(batch["error"]) == ["", "", "", "", "file not found"]
    np.testing.assert_array_equal(batch["image"][0], photos.load_file(by_path["path"][0]))


# --- The real thing ----------------------------------------------------------------------------------------


def train_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_trains_on_the_catalog_and_lists_exactly_the_broken_files(shop, folder_run):
    root, broken, _ = shop
    out, log = folder_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == sorted(STORE_CLASSES)
    assert metrics["accuracy"] >= 0.80, metrics["accuracy"]
    skipped = {str(Path(s["path"]).relative_to(root / "catalog")): s["reason"] for s in metrics["skipped_files"]}
    assert sorted(skipped) == sorted(broken)
    for name, word in broken.items():
        assert word in skipped[name]
    assert f"skipped {len(broken)} file(s) that cannot be read" in log

    # Only our lines; progress lines while the photos are read (the output is not a terminal); words for
    # photos, not test images, in the console and the report.
    lines = check_only_ours(log, at_most=60)
    assert any(line.startswith("reading photos: ") for line in lines), lines
    assert sum(bool(EPOCH.fullmatch(line)) for line in lines) == 3  # a line an epoch
    assert f"accuracy {metrics['accuracy']:.4f} over {metrics['count']} evaluation photos" in lines
    assert "test images" not in log and "test images" not in (out / "report.html").read_text()
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    rows = pd.read_parquet(out / "predictions.parquet")
    assert list(rows.columns) == ["id", "path", "label", "prediction", "confidence"]
    # 15 of each class's 151 files held out, less the broken files that fell among them.
    assert metrics["count"] == len(rows) and 60 - len(broken) <= len(rows) <= 60
    assert metrics["accuracy"] == pytest.approx(np.mean(rows["label"] == rows["prediction"]), abs=1e-6)
    assert json.loads((out / "checkpoint" / "model.json").read_text())["classes"] == sorted(STORE_CLASSES)
    assert (out / "mistakes.png").is_file() and "bags" in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_listing_of_the_same_files_gives_the_same_split_and_the_same_photos(ray_local, shop):
    root, _, _ = shop
    by_folder = catalog.open_catalog(TrainConfig(train_data=str(root / "catalog")))
    by_listing = catalog.open_catalog(TrainConfig(train_data=str(root / "listing.parquet")))
    assert sorted(by_folder.held["path"]) == sorted(by_listing.held["path"])
    assert by_folder.identity == by_listing.identity
    folder, listing = by_folder.prepare(), by_listing.prepare()
    assert folder.identity == listing.identity and folder.num_train == listing.num_train
    assert sorted(folder.eval_rows["path"]) == sorted(listing.eval_rows["path"])


@pytest.mark.slow
def test_evaluates_on_the_photos_given_with_eval_data(shop, tmp_path):
    root, _, new = shop
    out = tmp_path / "eval-data"
    proc = train_cli("--train-data", str(root / "catalog"), "--eval-data", str(root / "new"), "--epochs", "2",
                     "--batch-size", "32", "--output", str(out), "--storage-path", str(tmp_path / "storage"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = pd.read_parquet(out / "predictions.parquet")
    # Every photo of --eval-data evaluated, none held out of the training photos (all of them, but the broken).
    assert sorted(rows["path"]) == sorted(str(p) for paths in new.values() for p in paths)
    assert metrics["count"] == len(rows) == 40 and metrics["accuracy"] >= 0.8
    assert metrics["history"][-1]["rows"] == [4 * PER_CLASS]


@pytest.mark.slow
def test_tagging_with_the_catalog_model_gives_the_stores_names(shop, folder_run, tmp_path):
    root, _, new = shop
    out, _ = folder_run
    proc = subprocess.run([sys.executable, TAG, "--checkpoint", str(out / "checkpoint"), "--input", str(root / "new"),
                           "--output", str(tmp_path / "tags")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = pd.read_parquet(tmp_path / "tags" / "tags.parquet")
    assert set(tags["tag"]) <= set(STORE_CLASSES)
    truth = tags["path"].map(lambda p: Path(p).parent.name)
    assert (tags["tag"] == truth).mean() >= 0.8


# --- Bad input: one line, its exit code, no outputs ---------------------------------------------------------


def catalog_of(folder: Path, classes: dict[str, int], real: data.FashionMNIST, per_class: int = 3) -> Path:
    for name, label in classes.items():
        from tests.catalog import write_catalog

        write_catalog(folder / name, real.test.images[real.test.labels == label][:per_class])
    return folder


def no_path_label_listing(tmp_path, real):
    pd.DataFrame({"file": ["a.jpg"], "class": ["bags"]}).to_csv(tmp_path / "list.csv", index=False)
    return ["--train-data", str(tmp_path / "list.csv")]


def no_class_folders(tmp_path, real):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    return ["--train-data", str(tmp_path / "flat")]


def one_class(tmp_path, real):
    return ["--train-data", str(catalog_of(tmp_path / "one", {"bags": 8}, real))]


def eval_class_unknown_to_training(tmp_path, real):
    train = catalog_of(tmp_path / "train", {"bags": 8, "shoes": 7}, real)
    held = catalog_of(tmp_path / "held", {"bags": 8, "hats": 1}, real)
    return ["--train-data", str(train), "--eval-data", str(held)]


def class_without_a_readable_photo(tmp_path, real):
    shop = catalog_of(tmp_path / "shop", {"bags": 8, "shoes": 7}, real, per_class=6)
    (shop / "hats").mkdir()
    for i in range(2):
        (shop / "hats" / f"{i}.jpg").write_bytes(b"")
    return ["--train-data", str(shop)]


def mostly_unreadable(tmp_path, real):
    shop = catalog_of(tmp_path / "shop", {"bags": 8, "shoes": 7}, real, per_class=2)
    for name in ("bags", "shoes"):
        for i in range(3):
            (shop / name / f"bad-{i}.jpg").write_text("not a photo")
    return ["--train-data", str(shop)]


def with_data_dir(tmp_path, real):
    return ["--train-data", str(tmp_path), "--data-dir", str(tmp_path)]


def eval_data_alone(tmp_path, real):
    return ["--eval-data", str(tmp_path)]


BEFORE_RAY = [  # refused as the catalog is listed, before Ray starts
    (with_data_dir, 2, "--train-data replaces Fashion-MNIST: it does not go with --data-dir"),
    (eval_data_alone, 2, "--eval-data needs --train-data"),
    (no_path_label_listing, 1, "needs `path` and `label` columns (it has: file, class)"),
    (no_class_folders, 1, "holds no class sub-folders"),
    (one_class, 1, "has 1 class(es); a classifier needs two or more"),
    (eval_class_unknown_to_training, 1, "the evaluation photos have class 'hats', which the training photos lack"),
]
ONCE_READ = [  # refused once the photos are read
    (class_without_a_readable_photo, 1, "class 'hats' of"),
    (mostly_unreadable, 1, "6 of the 10 photos in"),
]


@pytest.mark.parametrize("make_args, code, complaint", BEFORE_RAY + [pytest.param(*case, marks=pytest.mark.slow)
                                                                     for case in ONCE_READ])
def test_bad_catalogs_are_one_line_errors_and_leave_no_outputs(real_data, tmp_path, make_args, code, complaint):
    out = tmp_path / "runs" / "r"
    proc = train_cli(*make_args(tmp_path, real_data), "--output", str(out), "--storage-path", str(tmp_path / "s"))
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and complaint in errors[0], proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


# --- Reading, dealing and resuming on this path ---------------------------------------------------------------


@pytest.mark.slow
def test_a_catalog_of_several_blocks_read_twice_trains_the_same_twice(ray_local, shop, tmp_path):
    # 545 training photos: 3 blocks of the read pass, whose tasks finish in whatever order they do.
    root, _, _ = shop
    histories = []
    for run in range(2):
        prepared = catalog.open_catalog(TrainConfig(train_data=str(root / "catalog"))).prepare()
        cfg = TrainConfig(epochs=1, batch_size=32, storage_path=str(tmp_path), run_name=f"again{run}")
        histories.append(fit(cfg, TrainPlan(2, 2, 1, False), prepared).history)
    assert len(prepared.train.refs) >= 3 and prepared.num_train > 2 * catalog.PHOTOS_PER_BLOCK
    assert [(h["loss"], h["accuracy"], h["weights"]) for h in histories[0]] == [
        (h["loss"], h["accuracy"], h["weights"]) for h in histories[1]]


@pytest.mark.slow
def test_the_photos_digest_is_of_the_photos_read_and_guards_a_resume(ray_local, shop, tmp_path):
    from clf.trainer import check_same_photos

    root, _, _ = shop
    rows = []
    for name in ("bags", "dresses"):
        for photo in sorted((root / "catalog" / name).glob("photo-*"))[:4]:
            (tmp_path / name).mkdir(exist_ok=True)
            shutil.copy(photo, tmp_path / name / photo.name)
            rows.append((f"{name}/{photo.name}", name))
    pd.DataFrame(rows, columns=["path", "label"]).to_parquet(tmp_path / "listing.parquet")
    cfg = TrainConfig(train_data=str(tmp_path / "listing.parquet"), run_name="r")
    first = catalog.open_catalog(cfg)
    before = first.prepare()
    # One photo reads otherwise now (a remote read that failed past its retries looks the same): the listing,
    # whose entries give no sizes, is the same; the photos used are not.
    (tmp_path / "bags" / rows[1][0].split("/")[1]).write_bytes(b"not a photo any more")
    again = catalog.open_catalog(cfg)
    after = again.prepare()
    assert again.identity == first.identity and after.identity != before.identity
    assert [s["path"] for s in after.skipped] == [str(tmp_path / rows[1][0])]
    earlier = {"settings": {"photos": before.identity}}
    check_same_photos(cfg, earlier, before.identity)
    with pytest.raises(ConfigError, match="run 'r' in .* was trained on other photos than the ones read now"):
        check_same_photos(cfg, earlier, after.identity)
