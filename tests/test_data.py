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


def test_a_data_dir_in_the_environment_comes_before_debians_and_an_explicit_one_is_the_only_one(tmp_path, monkeypatch):
    mine = make_dataset_dir(tmp_path / "mine", n_train=7)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(mine))
    assert len(data.load().train.labels) == 7  # not Debian's 60,000, which this machine may have
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="not found"):
        data.load(str(tmp_path / "empty"))  # no falling back to $CLF_DATA_DIR or Debian's


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


def test_preprocess_is_torchvisions_normalisation_with_the_datas_own_statistics(real_data):
    # Computed another way: torchvision's ToTensor and Normalize, with the mean and standard deviation of the
    # real training pixels themselves (not the constants the code uses).
    from PIL import Image
    from torchvision import transforms

    scaled = real_data.train.images / 255.0
    independent = transforms.Compose([transforms.ToTensor(), transforms.Normalize((scaled.mean(),), (scaled.std(),))])
    images = real_data.test.images[:16]
    expected = torch.stack([independent(Image.fromarray(image)) for image in images]).float()
    ours = data.preprocess(torch.from_numpy(images))
    assert ours.shape == (16, 1, 28, 28) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=5e-3, rtol=0)
    # The first test image's top-left pixel is background (0): -mean/std, about -0.81.
    assert ours[0, 0, 0, 0].item() == pytest.approx(-scaled.mean() / scaled.std(), abs=5e-3)


def test_the_rows_are_dealt_in_equal_runs_each_in_exactly_one_part():
    blocks = data.Blocks(refs=tuple(range(4)), counts=(5, 0, 7, 3))  # 15 rows; a block may be empty
    for world_size in (1, 2, 3, 4, 15, 16):
        parts = [blocks.part(rank, world_size) for rank in range(world_size)]
        rows = [[(i, r) for i, start, stop in part for r in range(start, stop)] for part in parts]
        flat = [row for part in rows for row in part]
        assert len(flat) == len(set(flat)) == 15  # every row once
        assert flat == [(i, r) for i, count in enumerate(blocks.counts) for r in range(count)]  # in block order
        assert max(map(len, rows)) - min(map(len, rows)) <= 1  # as equal as whole rows allow
        for part in parts:
            assert all(0 <= start < stop <= blocks.counts[i] for i, start, stop in part)
    assert blocks.part(1, 2) == [(2, 2, 7), (3, 0, 3)]


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


def test_the_validation_split_is_fixed_and_held_out_of_training_only(real_data):
    held = data.validation_ids(len(real_data.train.labels))
    assert len(held) == 5000 and len(np.unique(held)) == 5000 and held.min() >= 0 and held.max() < 60000
    np.testing.assert_array_equal(held, data.validation_ids(60000))  # the same rows every run
    # Every class is there in about its share (Fashion-MNIST's classes are balanced: 500 each).
    counts = np.bincount(real_data.train.labels[held], minlength=10)
    assert counts.min() > 400 and counts.max() < 600, counts
    assert len(data.validation_ids(4000)) == 4000 // 12  # a small training set keeps most of its rows
