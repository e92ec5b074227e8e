import gzip
import subprocess
import sys

import numpy as np
import pytest
import torch

from clf import data
from tests.helpers import ROOT, make_dataset_dir, write_idx


def test_reads_gz_and_raw_files_alike(tmp_path):
    gz = data.load(str(make_dataset_dir(tmp_path / "gz", seed=1, gz=True)))
    raw = data.load(str(make_dataset_dir(tmp_path / "raw", seed=1, gz=False)))
    assert gz.train.images.shape == (64, 28, 28) and gz.train.images.dtype == np.uint8
    assert gz.test.labels.shape == (32,) and gz.test.labels.dtype == np.int64
    np.testing.assert_array_equal(gz.train.images, raw.train.images)
    np.testing.assert_array_equal(gz.test.labels, raw.test.labels)


def test_reads_torchvisions_download_layout(tmp_path):
    make_dataset_dir(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert data.load(str(tmp_path)).train.images.shape == (64, 28, 28)


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dirs = data.candidate_dirs(None)
    assert dirs == [tmp_path / "env", data.DEBIAN_DIR, tmp_path / "cache" / "clf" / "fashion-mnist"]
    # An explicit --data-dir is the only place looked at.
    assert data.candidate_dirs(str(tmp_path / "mine")) == [tmp_path / "mine"]


def test_missing_folder_names_where_it_looked(tmp_path):
    with pytest.raises(data.DataError, match="not a folder.*apt-get install dataset-fashion-mnist"):
        data.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"not found \(looked in .*empty\)"):
        data.load(str(tmp_path / "empty"))


def test_truncated_gz(tmp_path):
    folder = make_dataset_dir(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz is not a readable idx images file"):
        data.load(str(folder))


def test_wrong_magic_number(tmp_path):
    folder = make_dataset_dir(tmp_path)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(32, np.uint8), magic=0x00000803)
    with pytest.raises(data.DataError, match="magic number 0x00000803, not 0x00000801"):
        data.load(str(folder))


def test_labels_out_of_range(tmp_path):
    folder = make_dataset_dir(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte", np.full(64, 10, np.uint8))
    with pytest.raises(data.DataError, match=r"labels outside 0\.\.9 \(found 10\.\.10\)"):
        data.load(str(folder))


def test_image_and_label_counts_differ(tmp_path):
    folder = make_dataset_dir(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(63, np.uint8))
    with pytest.raises(data.DataError, match="64 images but .* 63 labels"):
        data.load(str(folder))


def test_payload_shorter_than_header_says(tmp_path):
    folder = make_dataset_dir(tmp_path, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DataError, match="not a readable idx images file"):
        data.load(str(folder))


def test_preprocess_is_normalised_and_shaped():
    images = torch.tensor([[[0] * 28] * 28, [[255] * 28] * 28], dtype=torch.uint8)
    x = data.preprocess(images)
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert x[0].unique().item() == pytest.approx(-data.PIXEL_MEAN / data.PIXEL_STD)
    assert x[1].unique().item() == pytest.approx((1 - data.PIXEL_MEAN) / data.PIXEL_STD)


def test_real_data_is_fashion_mnist(real_data):
    assert real_data.train.images.shape == (60000, 28, 28)
    assert real_data.test.images.shape == (10000, 28, 28)
    assert np.bincount(real_data.train.labels).tolist() == [6000] * 10
    assert np.bincount(real_data.test.labels).tolist() == [1000] * 10
    # The pixel statistics the normalisation constants claim.
    scaled = real_data.train.images / 255.0
    assert scaled.mean() == pytest.approx(data.PIXEL_MEAN, abs=1e-3)
    assert scaled.std() == pytest.approx(data.PIXEL_STD, abs=1e-3)


def folder_missing(folder):
    return folder.parent / "absent"


def gz_truncated(folder):
    p = folder / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()))[:150])
    return folder


def wrong_magic(folder):
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((64, 28, 28), np.uint8), magic=0x00000D03)
    return folder


def labels_out_of_range(folder):
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(32, 200, np.uint8))
    return folder


def counts_differ(folder):
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((31, 28, 28), np.uint8))
    return folder


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (folder_missing, "is not a folder"),
        (gz_truncated, "is not a readable idx images file"),
        (wrong_magic, "magic number"),
        (labels_out_of_range, "labels outside"),
        (counts_differ, "images but"),
    ],
)
def test_bad_data_is_a_one_line_error_and_leaves_no_outputs(tmp_path, corrupt, message):
    folder = corrupt(make_dataset_dir(tmp_path / "data"))
    out = tmp_path / "runs" / "r"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--data-dir", str(folder), "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()
    assert list((tmp_path / "runs").iterdir()) == []  # the staging folder is gone too
