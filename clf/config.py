"""The settings of a training run, in one typed, frozen place.

Defaults live here and nowhere else. Ray's `train_loop_config` wants a plain dict: `to_dict()` converts at
that boundary and the worker rebuilds the dataclass with `TrainConfig.from_dict()` on its first line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ClfError(Exception):
    """An error meant for a person: its message is printed as one line, without a traceback."""


class ConfigError(ClfError):
    """A setting that cannot work (a usage error)."""


def first_line(error: Exception) -> str:
    """An exception's message cut to one line, for an error that must fit on one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    """Passes over the 60,000 training images."""

    batch_size: int = 128
    """Global batch size: images per optimizer step, summed over all workers."""

    lr: float = 1e-2
    """Peak learning rate of the one-cycle schedule, for `batch_size` images per step."""

    weight_decay: float = 5e-4
    """Adam's L2 penalty."""

    label_smoothing: float = 0.1
    """Cross-entropy label smoothing: worth about half a point of test accuracy at two epochs."""

    num_workers: int | None = None
    """Training workers. None: 1 on CPU (one process using every core beats several single-threaded
    ones on a small machine), the number of GPUs in the cluster with `use_gpu`."""

    min_workers: int | None = None
    """Elastic training: the fewest workers a run goes on with when nodes are lost (or not there at the
    start), up to `num_workers`. None: exactly `num_workers`, waiting for lost ones to be replaced."""

    cpus_per_worker: int | None = None
    """CPUs (and torch threads) per training worker. None: the cluster's CPUs divided by the workers,
    so a laptop run uses all its cores."""

    use_gpu: bool = False
    """One GPU per training worker and per inference actor."""

    seed: int = 0
    """Seeds weights, shuffling and dropout: the same seed and worker count give the same metrics."""

    data_dir: str | None = None
    """Folder holding the four Fashion-MNIST idx files (.gz or not). None: search the usual places."""

    download: bool = False
    """Allow torchvision to download the data into the local cache when it is found nowhere else."""

    output: str | None = None
    """Folder for metrics.json, predictions.parquet and checkpoint/. None: runs/<timestamp>."""

    storage_path: str | None = None
    """Where Ray Train keeps its checkpoints while it runs (shared storage on a multi-node cluster).
    None: Ray's default, ~/ray_results."""

    run_name: str | None = None
    """The run's name in `storage_path`. Started again with the same name and storage, a run resumes from
    its latest checkpoint. None: a new name for every run."""

    max_failures: int = 2
    """Worker failures (a killed process, a lost node) Ray Train recovers from by restarting the workers
    from the latest checkpoint; the next one fails the run."""

    infer_batch_size: int = 1024
    """Images per batch in the Ray Data inference job."""

    num_infer_actors: int | None = None
    """Inference actors, each holding one copy of the model. None: one per GPU with `use_gpu`, else one
    single-threaded actor per CPU of the cluster."""

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "infer_batch_size": self.infer_batch_size,
        }
        optional_positive = {
            "num_workers": self.num_workers,
            "min_workers": self.min_workers,
            "cpus_per_worker": self.cpus_per_worker,
            "num_infer_actors": self.num_infer_actors,
        }
        for name, value in positive.items():
            _check_int(name, value)
        for name, value in optional_positive.items():
            if value is not None:
                _check_int(name, value)
        _check_int("max_failures", self.max_failures, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be zero or more, got {self.weight_decay}")
        if self.num_workers is not None and self.batch_size < self.num_workers:
            raise ConfigError(
                f"batch_size ({self.batch_size}) is smaller than num_workers ({self.num_workers}): "
                "each worker needs at least one image per step"
            )
        if self.min_workers is not None and self.num_workers is not None and self.min_workers > self.num_workers:
            raise ConfigError(f"min_workers ({self.min_workers}) is more than num_workers ({self.num_workers})")
        if self.run_name is not None and (
            not self.run_name.strip() or self.run_name in (".", "..") or any(c in self.run_name for c in "/\\")
        ):
            raise ConfigError(f"run_name must be a plain folder name, got {self.run_name!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**values)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


TAG_FORMATS = ("parquet", "csv")


@dataclass(frozen=True)
class TagConfig:
    checkpoint: str
    """A training run's checkpoint folder (runs/NAME/checkpoint)."""

    input: str
    """A folder of product photos (every file in it and below gets a row), or a .parquet / .csv file
    with a `path` column listing them (relative paths are relative to that file's folder)."""

    output: str
    """New folder for tags.parquet (or tags.csv); an existing one is refused."""

    num_actors: int | None = None
    """Predictor actors. None: one per GPU with `use_gpu`, else one per CPU but one, which is left to the
    tasks that read and decode the photos."""

    batch_size: int = 256
    """Photos per batch, for decoding and for the model."""

    use_gpu: bool = False
    """One GPU per predictor actor."""

    review_threshold: float = 0.6
    """Rows whose confidence (the top class's softmax probability) is below this get needs_review."""

    format: str = "parquet"
    """"parquet" (tags.parquet, a folder of Parquet files) or "csv" (tags.csv, a folder of CSV files)."""

    def __post_init__(self) -> None:
        for name in ("checkpoint", "input", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a path, got {getattr(self, name)!r}")
        _check_int("batch_size", self.batch_size)
        if self.num_actors is not None:
            _check_int("num_actors", self.num_actors)
        if not 0 <= self.review_threshold <= 1:
            raise ConfigError(f"review_threshold must be between 0 and 1, got {self.review_threshold}")
        if self.format not in TAG_FORMATS:
            raise ConfigError(f"format must be one of {', '.join(TAG_FORMATS)}, got {self.format!r}")

    @property
    def tags_name(self) -> str:
        """The name of the tags in the output folder: tags.parquet or tags.csv."""
        return f"tags.{self.format}"


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
