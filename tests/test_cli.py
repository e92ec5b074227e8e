import dataclasses
import math
import os
import socket
import subprocess
import sys

import pytest

from clf import cli
from clf.config import TagConfig, TrainConfig
from clf.errors import ConfigError
from tests.helpers import ROOT, make_dataset_dir

TRAIN = str(ROOT / "jobs" / "train.py")


def run_train(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, env=env)


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
        (["--lr", "inf"], "--lr: must be a positive number"),
        (["--label-smoothing", "1"], "--label-smoothing: must be between 0 and 1 (excluded), got 1.0"),
        (["--weight-decay", "-0.1"], "--weight-decay: must be zero or a positive number, got -0.1"),
        (["--epochs", "two"], "--epochs: 'two' is not a whole number"),
        (["--num-workers", "4", "--batch-size", "2"], "batch_size (2) is smaller than num_workers (4)"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--num-workers", "2", "--min-workers", "3"], "min_workers (3) is more than num_workers (2)"),
        (["--run-name", "../elsewhere"], "--run-name: must be a plain folder name"),
        (["--min-workers", "0"], "--min-workers: must be at least 1, got 0"),
    ],
)
def test_bad_flag_values_are_usage_errors(args, complaint):
    proc = run_train(*args)
    assert proc.returncode == 2
    assert complaint in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error:")


@pytest.mark.parametrize("job", ["train.py", "tune.py"])  # tune.py writes it after its search: refused first
def test_existing_output_is_refused(tmp_path, job):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--output", str(tmp_path / "run"),
                           "--storage-path", str(tmp_path / "storage")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{job}: error: --output {tmp_path / 'run'} exists already; choose a new folder (runs are never overwritten)"
    ]
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}" and not (tmp_path / "storage").exists()


def test_config_checks_its_own_values():
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="batch_size must be a whole number"):
        TrainConfig(batch_size=True)
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        TrainConfig(lr=math.inf)  # once refused by the command line and accepted by the config
    cfg = TrainConfig(epochs=3, lr=0.01)
    assert TrainConfig(**dataclasses.asdict(cfg)) == cfg  # the dict at Ray's boundary rebuilds it


@pytest.mark.parametrize("config_class", [TrainConfig, TagConfig])
def test_every_setting_is_a_flag_with_the_fields_help_and_default(config_class):
    parser = cli.parser_for(config_class, "test")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        assert actions[name].option_strings == [cli.flag(name)]
        assert actions[name].help.startswith(f.metadata["help"])
        if f.default is dataclasses.MISSING:
            assert actions[name].required
        else:
            assert actions[name].default == f.default


def test_flags_make_the_config_they_name():
    cfg = cli.parse(TrainConfig, "test", [
        "--epochs", "3", "--batch-size", "64", "--lr", "0.02", "--weight-decay", "0", "--label-smoothing", "0.05",
        "--num-workers", "2", "--min-workers", "1", "--cpus-per-worker", "1", "--use-gpu", "--seed", "7",
        "--data-dir", "d", "--download", "--output", "o", "--storage-path", "s", "--run-name", "r",
        "--max-failures", "0", "--infer-batch-size", "32", "--num-infer-actors", "3", "--dashboard",
    ])
    assert cfg == TrainConfig(
        epochs=3, batch_size=64, lr=0.02, weight_decay=0.0, label_smoothing=0.05, num_workers=2, min_workers=1,
        cpus_per_worker=1, use_gpu=True, seed=7, data_dir="d", download=True, output="o", storage_path="s",
        run_name="r", max_failures=0, infer_batch_size=32, num_infer_actors=3, dashboard=True,
    )
    assert cli.parse(TrainConfig, "test", []) == TrainConfig()
    tag = cli.parse(TagConfig, "test", ["--checkpoint", "c", "--input", "i", "--output", "o", "--format", "csv"])
    assert tag == TagConfig(checkpoint="c", input="i", output="o", format="csv")


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


@pytest.mark.slow
def test_use_gpu_without_a_gpu_and_a_ray_that_fails_to_start_are_one_line_errors(tmp_path):
    data_dir = str(make_dataset_dir(tmp_path / "data"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # No GPU for the embedded Ray, whatever this machine has: it finds the GPUs CUDA shows it.
    proc = run_train("--use-gpu", "--data-dir", data_dir, "--output", str(tmp_path / "gpu"), timeout=180,
                     env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "train.py: error: --use-gpu was given but the Ray cluster has no GPU (and no autoscaler that can add one)"]
    # The dashboard is given no time to come up: Ray raises a plain Exception with its log's last lines,
    # which used to end the job in a 40-line traceback.
    proc = run_train("--dashboard", "--data-dir", data_dir, "--output", str(tmp_path / "dash"), timeout=180,
                     env={**env, "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "0"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # Ray's own lines about the failure may come before ours; ours is the last, one line.
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: could not start or join a local Ray: ")
    assert not list(tmp_path.glob("*/")) or sorted(p.name for p in tmp_path.iterdir()) == ["data"]
