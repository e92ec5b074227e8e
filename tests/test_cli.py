import os
import socket
import subprocess
import sys

import pytest

from clf.config import ConfigError, TrainConfig
from conftest import ROOT, make_dataset_dir

TRAIN = str(ROOT / "jobs" / "train.py")


def run_train(*args, timeout=60):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_flags():
    proc = run_train("--help")
    assert proc.returncode == 0
    for flag in ("--epochs", "--batch-size", "--lr", "--num-workers", "--use-gpu", "--seed", "--data-dir", "--output"):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
        (["--batch-size", "-1"], "--batch-size: must be at least 1, got -1"),
        (["--lr", "0"], "--lr: must be a positive number"),
        (["--lr", "nan"], "--lr: must be a positive number"),
        (["--epochs", "two"], "--epochs: 'two' is not a whole number"),
        (["--num-workers", "4", "--batch-size", "2"], "batch_size (2) is smaller than num_workers (4)"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--num-workers", "2", "--min-workers", "3"], "min_workers (3) is more than num_workers (2)"),
        (["--run-name", "../elsewhere"], "run_name must be a plain folder name"),
        (["--min-workers", "0"], "--min-workers: must be at least 1, got 0"),
    ],
)
def test_bad_flag_values_are_usage_errors(args, complaint):
    proc = run_train(*args)
    assert proc.returncode == 2
    assert complaint in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error:")


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    proc = run_train("--output", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: --output {tmp_path / 'run'} exists already; choose a new folder (runs are never overwritten)"
    ]
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"


def test_config_checks_its_own_values():
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError):
        TrainConfig(batch_size=True)
    with pytest.raises(ConfigError):
        TrainConfig(lr=-1.0)
    cfg = TrainConfig(epochs=3, lr=0.01)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_unreachable_ray_address_is_a_one_line_error(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, TRAIN, "--data-dir", str(make_dataset_dir(tmp_path / "data")), "--output", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port} (Connection refused)"
    ]
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def test_output_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_train("--output", str(blocker / "run"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --output {blocker / 'run'} cannot be written")


def test_use_gpu_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    proc = run_train("--use-gpu", "--data-dir", str(make_dataset_dir(tmp_path / "data")), "--output", str(out), timeout=180)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: --use-gpu was given but the Ray cluster has no GPU")
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))
