"""Every path a user gives may be a URI: listing, reading, checkpoints and outputs in a real S3-compatible
server on loopback (moto's server mode, over HTTP), reads that fail for a moment (a proxy answering 503),
and locations that cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from clf import catalog, checkpoint, storage
from clf.errors import ClfError, ConfigError
from clf import photos
from clf.tagging.pipeline import list_inputs
from tests.catalog import write_catalog
from tests.helpers import ROOT
from tests.s3 import FlakyProxy, client_env

pytestmark = pytest.mark.slow  # every test here talks to the S3 server on loopback

TRAIN = str(ROOT / "jobs" / "train.py")


@pytest.fixture(scope="module")
def shop_in_a_bucket(s3, real_data, tmp_path_factory):
    """A catalog of 2 classes x 3 photos, on the local disk and under s3://shop/catalog/, and a Parquet listing
    of the same photos in the bucket, with keys relative to it."""
    local = tmp_path_factory.mktemp("shop")
    write_catalog(local / "catalog" / "bags", real_data.test.images[real_data.test.labels == 8][:3])
    write_catalog(local / "catalog" / "shoes", real_data.test.images[real_data.test.labels == 7][:3])
    bucket = s3.bucket("shop")
    s3.upload(local / "catalog", f"{bucket}/catalog")
    keys = s3.keys(f"{bucket}/catalog")
    rows = pd.DataFrame({"path": [f"catalog/{k}" for k in keys], "label": [k.split("/")[0] for k in keys]})
    listing = local / "listing.parquet"
    rows.sample(frac=1, random_state=0).to_parquet(listing)
    s3.upload(listing, f"{bucket}/listing.parquet")
    return local, bucket


def test_a_prefix_of_class_folders_and_a_listing_of_relative_keys_list_the_same_photos(shop_in_a_bucket):
    local, bucket = shop_in_a_bucket
    by_prefix = catalog.list_labelled(f"{bucket}/catalog/", "--train-data")
    by_listing = catalog.list_labelled(f"{bucket}/listing.parquet", "--train-data")
    on_disk = catalog.list_labelled(str(local / "catalog"), "--train-data")
    assert by_prefix["path"].tolist()[0].startswith("s3://shop/catalog/bags/photo-")
    assert sorted(zip(by_prefix["path"], by_prefix["label"])) == sorted(zip(by_listing["path"], by_listing["label"]))
    assert by_prefix["label"].tolist() == on_disk["label"].tolist()
    sizes = [os.path.getsize(p) for p in on_disk["path"]]
    assert by_prefix["size"].tolist() == sizes  # from the bucket's own listing, no request per file
    # Read from the bucket, the photos are the ones on the disk.
    batch = photos.read_photos({"path": np.array(by_prefix["path"].tolist() + [f"{bucket}/catalog/gone.jpg"])})
    assert list(batch["error"]) == [""] * 6 + ["file not found"]
    np.testing.assert_array_equal(batch["image"][0], photos.load_file(on_disk["path"][0]))
    assert batch["size"].tolist() == sizes + [-1]  # the bytes read


def test_inputs_to_tag_in_a_bucket_a_prefix_or_a_listing_of_uris(s3, shop_in_a_bucket, tmp_path):
    local, bucket = shop_in_a_bucket
    files = list_inputs(f"{bucket}/catalog/")
    assert len(files) == 6 and all(f.startswith("s3://shop/catalog/") for f in files)
    pd.DataFrame({"path": [files[0], "catalog/bags/x.jpg", "/on/the/driver.jpg"]}).to_csv(tmp_path / "l.csv", index=False)
    s3.upload(tmp_path / "l.csv", f"{bucket}/lists/l.csv")
    assert list_inputs(f"{bucket}/lists/l.csv") == [files[0], "s3://shop/lists/catalog/bags/x.jpg", "/on/the/driver.jpg"]
    with pytest.raises(ConfigError, match="does not exist"):
        list_inputs(f"{bucket}/nothing-here/")
    with pytest.raises(ConfigError, match="cannot be reached"):
        list_inputs("nosuchscheme://x/y")


def test_a_checkpoint_in_a_bucket_is_read_like_a_local_one(s3, tmp_path):
    import torch

    from clf.data import CLASSES
    from clf.model import FashionCNN

    torch.manual_seed(0)
    checkpoint.save(tmp_path / "ckpt", FashionCNN(channels=(4, 8), hidden=16), CLASSES)
    uri = s3.upload(tmp_path / "ckpt", f"{s3.bucket('models')}/run/checkpoint")
    remote, local = checkpoint.read(uri), checkpoint.read(str(tmp_path / "ckpt"))
    assert remote.weights == local.weights and remote.description == local.description
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(checkpoint.build(remote)[0](x), checkpoint.build(local)[0](x))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint folder s3://models/elsewhere does not exist"):
        checkpoint.read("s3://models/elsewhere")


def test_remote_reads_that_fail_for_a_moment_are_tried_again(s3, shop_in_a_bucket, monkeypatch):
    _, bucket = shop_in_a_bucket
    keys = s3.keys(f"{bucket}/catalog")
    # pyarrow's S3 client retries each request itself (31 times over about 10 s for a 503, measured): the
    # first photo fails for longer than one read survives, the second always.
    proxy = FlakyProxy(s3.port, {keys[0]: 35, keys[1]: None})
    try:
        monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
        monkeypatch.setattr(storage, "READ_ATTEMPTS", 2)
        for name, value in client_env(proxy.endpoint).items():
            monkeypatch.setenv(name, value)
        batch = photos.read_photos({"path": np.array([f"{bucket}/catalog/{k}" for k in keys[:3]])})
    finally:
        proxy.stop()
    per_read = proxy.failed[keys[1]] // 2  # what one of our tries took before it gave up
    assert proxy.failed[keys[0]] == 35 > per_read
    assert batch["error"][0] == "" and batch["error"][2] == ""  # read once the outage passed
    assert batch["error"][1].startswith("could not read or decode (OSError:")  # unreadable, with its reason
    assert "503" in batch["error"][1] and batch["size"][1] == -1


def test_outputs_in_a_bucket_are_uploaded_with_the_summary_last(s3, monkeypatch):
    bucket = s3.bucket("outputs")
    proxy = FlakyProxy(s3.port, {})
    try:
        for name, value in client_env(proxy.endpoint).items():
            monkeypatch.setenv(name, value)
        with storage.staged_output(f"{bucket}/run", last="metrics.json") as staging:
            for name in ("metrics.json", "a.parquet", "z.png"):
                (staging / name).write_text(name)
            (staging / "checkpoint").mkdir()
            (staging / "checkpoint" / "model.pt").write_text("weights")
        uploads = [path.split("?")[0] for method, path in proxy.requests if method == "PUT" and "/run/" in path]
    finally:
        proxy.stop()
    # Files only: not the folder markers, nor the marker that checked the place could be written.
    uploads = [path for path in uploads if not path.endswith("/") and "/.clf-check-" not in path]
    assert s3.keys(f"{bucket}/run") == ["a.parquet", "checkpoint/model.pt", "metrics.json", "z.png"]
    assert len(uploads) == 4 and uploads[-1] == "/outputs/run/metrics.json"
    assert not staging.exists()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    # A run that failed after the check leaves nothing there: the same output can be used again.
    with pytest.raises(KeyboardInterrupt):
        with storage.staged_output(f"{bucket}/interrupted", last="metrics.json"):
            raise KeyboardInterrupt
    assert storage.Place.of(f"{bucket}/interrupted").kind() == pafs.FileType.NotFound
    with pytest.raises(ConfigError, match="exists already"):
        with storage.staged_output(f"{bucket}/run", last="metrics.json"):
            pass


def test_an_upload_that_fails_leaves_nothing_that_looks_like_an_output(s3, monkeypatch):
    bucket = s3.bucket("flaky-outputs")
    proxy = FlakyProxy(s3.port, {"/run/metrics.json": None})
    try:
        monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
        for name, value in client_env(proxy.endpoint).items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ClfError, match=r"--output s3://flaky-outputs/run: uploading metrics.json failed .* no "
                                           r"metrics.json was written there"):
            with storage.staged_output(f"{bucket}/run", last="metrics.json") as staging:
                (staging / "metrics.json").write_text("{}")
                (staging / "predictions.parquet").write_text("rows")
    finally:
        proxy.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert storage.Place.of(f"{bucket}/run").kind() == pafs.FileType.NotFound  # not even a folder marker


@pytest.mark.parametrize("location, complaint", [
    ("/proc/forbidden", "--storage-path /proc/forbidden cannot be written ("),
    ("s3://no-such-bucket/checkpoints", "--storage-path s3://no-such-bucket/checkpoints cannot be written ("),
])
def test_a_storage_that_cannot_be_written_is_refused(s3, location, complaint):
    with pytest.raises(ConfigError) as refused:
        storage.check_writable(location, "--storage-path")
    assert str(refused.value).startswith(complaint) and "\n" not in str(refused.value)


def test_a_writable_storage_keeps_no_marker(s3, tmp_path):
    bucket = s3.bucket("checked")
    storage.check_writable(f"{bucket}/runs", "--storage-path")
    storage.check_writable(str(tmp_path / "runs"), "--storage-path")
    assert s3.keys(bucket) == [] and list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("storage_path", ["/proc/forbidden", "s3://no-such-bucket/ckpt"])
def test_the_job_refuses_a_storage_it_cannot_write_before_ray_starts(s3, real_data, tmp_path, storage_path):
    from tests.helpers import real_dataset_dir

    data_dir = real_dataset_dir(real_data, tmp_path / "data", n_train=100, n_test=50)
    proc = subprocess.run([sys.executable, TRAIN, "--data-dir", str(data_dir), "--output", str(tmp_path / "out"),
                           "--storage-path", storage_path], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        next(line for line in proc.stderr.splitlines() if line.startswith(f"train.py: error: --storage-path {storage_path} cannot be written ("))
    ]
    assert "Ray" not in proc.stdout + proc.stderr.replace("train.py", "")  # refused before Ray started
    assert not (tmp_path / "out").exists()
