"""The settings search: Ray Tune tries learning rate, batch size, weight decay, label smoothing and the network's
width, each trial a TorchTrainer of the job's own loop (`clf.trainer`), on the training data less a validation
split held out of it (Fashion-MNIST: a fixed 5,000 of the 60,000; a catalog: a share of each class's training
photos). ASHA stops the weaker trials early; the trial with the best validation accuracy at its last epoch wins,
never judged on the test set. The winner's settings are then trained and evaluated as a normal run
(`clf.pipeline.run`: the usual outputs, test-set metrics), with trials.csv beside them.

Before any trial, the search checks what jobs/train.py checks (the storage and local paths every node must see,
the tracking store) and plans each trial's workers as training does, on what is free; trials run side by side as
many as fit on the nodes, each trial's driver in a Tune trial taking no CPU of its own. The data is read and put
in the object store once; every trial's workers fetch their parts of the same blocks, and so does the final run
(the validation rows trained on too). An interrupted search started again with the same --run-name resumes
(Tune's restore): finished trials are kept, unfinished ones run again.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import sys

from ray.tune import Callback

from clf import catalog, data, plan, ray_train, session, storage, tracking
from clf.cluster import cluster_nodes
from clf.config import TrainConfig, TuneConfig
from clf.data import TrainingRows
from clf.errors import ClfError, Interrupted, first_line

# What is searched: Ray Tune's sampling functions by setting. Batch sizes are global (all workers together).
SPACE = {
    "lr": ("loguniform", 1e-3, 3e-2),
    "batch_size": ("choice", [64, 128, 256]),
    "weight_decay": ("loguniform", 1e-5, 1e-3),
    "label_smoothing": ("uniform", 0.0, 0.2),
    "width": ("choice", [1.0, 1.25, 1.5, 2.0]),
}
METRIC = "val_accuracy"
COLUMNS = ["trial", *SPACE, "val_accuracy", "epochs", "stopped_early", "error"]


def param_space() -> dict:
    from ray import tune

    return {name: getattr(tune, kind)(*args) for name, (kind, *args) in SPACE.items()}


def describe(settings: dict) -> str:
    return (f"lr {settings['lr']:.4g}, batch {settings['batch_size']}, weight decay {settings['weight_decay']:.2g}, "
            f"smoothing {settings['label_smoothing']:.3f}, width {settings['width']:g}")


def base_config(cfg: TuneConfig, **more) -> TrainConfig:
    """The training settings every trial shares: the data, the seed, and sizes."""
    return TrainConfig(epochs=cfg.epochs, seed=cfg.seed, data_dir=cfg.data_dir, train_data=cfg.train_data,
                       eval_data=cfg.eval_data, eval_fraction=cfg.eval_fraction, storage_path=cfg.storage_path,
                       num_workers=cfg.workers_per_trial, cpus_per_worker=cfg.cpus_per_worker, **more)


def _trial(settings: dict, base: dict, rows: TrainingRows, workers: dict) -> None:
    """One trial, in a Tune trial: the job's TorchTrainer with these settings, reporting every epoch's record
    to Tune (TuneReportCallback: Ray Train V2's way into Tune). Each start of a trial is a new training run
    (its own run name): a trial that an interrupted search restarts trains from its first epoch again, and
    reports every epoch to Tune, where resuming its Ray Train run would report only the epochs left."""
    import secrets

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from clf import trainer

    run_name = f"{trial_prefix(base['run_name'], tune.get_context().get_trial_id())}{secrets.token_hex(3)}"
    cfg = TrainConfig(**(base | settings | {"run_name": run_name}))
    trainer._trainer(cfg, plan.TrainPlan(**workers), rows, rows.identity, board=None, mlflow_run_id=None,
                     callbacks=[TuneReportCallback()], in_tune=True).fit()


def trial_prefix(search: str, trial_id: str) -> str:
    """The start of the training runs' names of one trial (one run per start of the trial)."""
    return f"{search}-{trial_id}-"


def trial_number(trial_id: str) -> int:
    """1, 2, ... in the order Tune made the trials (its ids end in _00000, _00001, ...), the same after a resume."""
    return int(trial_id.rsplit("_", 1)[-1]) + 1


# The search's MLflow runs, in the driver: the search's own, and the open run of each trial. Module state, not
# the callback's: Tune pickles the callback with the search's state and restores it on a resume.
TRACKING: dict = {"search": None, "trials": {}}


class TrialCallback(Callback):
    """Tune's callback, in the driver, that follows each trial: a line per trial's start, epoch and error; with
    tracking, each trial a nested MLflow run (the driver is the one writer; a trial's run that cannot be started
    is one warning, and the search goes on); when Tune ends a trial (done, stopped by ASHA, or failed), the
    placement group of its workers, which Tune's stop leaves behind (ray_train.remove_placement_groups)."""

    def __init__(self, name: str, total: int, epochs: int):
        self.name, self.total, self.epochs = name, total, epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        number = trial_number(trial.trial_id)
        print(f"trial {number}/{self.total}: {describe(trial.config)}", flush=True)
        if (search := TRACKING["search"]) is not None:
            try:
                child = tracking.Tracker.start(search.uri, "tune.py", f"{self.name} trial {number}",
                                               tags={"mlflow.parentRunId": search.run_id, "clf.kind": "trial"})
            except ClfError as e:
                print(f"tune.py: warning: trial {number} is not tracked ({first_line(e)}); the search goes on",
                      file=sys.stderr, flush=True)
                return
            child.params(trial.config)
            TRACKING["trials"][trial.trial_id] = child

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"trial {trial_number(trial.trial_id)}/{self.total}: epoch {result['epoch']}/{self.epochs}, "
              f"validation accuracy {result[METRIC]:.4f}", flush=True)
        if child := TRACKING["trials"].get(trial.trial_id):
            child.epoch(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        ray_train.remove_placement_groups(trial_prefix(self.name, trial.trial_id))
        if child := TRACKING["trials"].pop(trial.trial_id, None):
            child.end()

    def on_trial_error(self, iteration, trials, trial, **info):
        ray_train.remove_placement_groups(trial_prefix(self.name, trial.trial_id))
        print(f"trial {trial_number(trial.trial_id)}/{self.total}: failed (its error: {trial.error_file or 'its log'})",
              flush=True)
        if child := TRACKING["trials"].pop(trial.trial_id, None):
            child.end("FAILED")


def trials_table(results, epochs: int):
    """One row per trial: its settings, its validation accuracy at its last epoch, the epochs it ran, whether
    ASHA stopped it early, and its error if it failed; best first."""
    import pandas as pd

    rows = []
    for result in results:
        ran = int((result.metrics or {}).get("training_iteration", 0))
        # The trial's id, in its folder's name: "_trial_e1099_00001_1_batch_size=...".
        trial_id = re.search(r"_([0-9a-f]+_\d{5})_", result.path.rstrip("/").rsplit("/", 1)[-1]).group(1)
        rows.append({"trial": trial_number(trial_id), **{k: result.config.get(k) for k in SPACE},
                     "val_accuracy": (result.metrics or {}).get(METRIC), "epochs": ran,
                     "stopped_early": result.error is None and ran < epochs,
                     "error": "" if result.error is None else str(result.error).splitlines()[0]})
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["val_accuracy", "trial"], ascending=[False, True], na_position="last", ignore_index=True)


def _tuner(cfg: TuneConfig, name: str, path: str, trainable, concurrent: int, resuming: bool):
    """The search's Tuner: restored from `path` when `resuming` (finished trials kept, unfinished ones run again),
    else a new one; says which on the console."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if resuming:
        print(f"search {name}: resuming it from {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    print(f"search {name}: its state in {path} (if it is interrupted, start it again with --run-name {name} "
          "to resume it)", flush=True)
    return tune.Tuner(
        trainable, param_space=param_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=cfg.trials,
            # The generator itself keeps the trials at `concurrent` (Tune ignores max_concurrent_trials when
            # given a generator): more would wait for CPUs until Ray Train's start-up times out.
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs,
                                    grace_period=cfg.grace_epochs, reduction_factor=2)),
        run_config=tune.RunConfig(name=name, storage_path=storage.checkpoint_storage(cfg.storage_path),
                                  verbose=0, callbacks=[TrialCallback(name, cfg.trials, cfg.epochs)]),
    )


def _checked(cfg: TuneConfig, name: str):
    """What jobs/train.py checks before any work, for the search and its trials: the data listed (or read) and
    its local paths seen by every node, the tracking store and the checkpoint storage tried (a local one seen by
    every node), each trial's workers planned on what is free; (the data's source, the trials' plan, how many
    trials fit side by side, the tracking URI)."""
    from clf import trainer

    base = base_config(cfg, run_name=name)
    source = catalog.open_catalog(base) if cfg.train_data else data.load(cfg.data_dir)
    if uri := tracking.tracking_uri(cfg.tracking_uri):
        tracking.connect(uri)  # the tracking store answers, before any work
    storage.check_writable(storage.checkpoint_storage(cfg.storage_path), "--storage-path")
    ray_train.quiet_tune(cfg.ray_logs)
    session.connect(cfg.ray_logs, cfg.dashboard)
    cluster = cluster_nodes()
    workers = plan.plan_training(base, cluster)
    trainer.check_storage_is_shared(base, cluster)
    if cfg.train_data:
        source.check_every_node_reads(cluster)
    # A trial's workers are placed as a group (one per bundle of its CPUs): as many trials as whole groups fit.
    concurrent = max(1, plan.holds(cluster.free(), workers.cpus_per_worker) // workers.num_workers)
    return source, workers, concurrent, uri


def run(cfg: TuneConfig) -> tuple[str, object]:
    """Search, then train the best settings as a normal run on the same data, read once; (the output, the trials
    table)."""
    import ray

    from clf import pipeline, trainer

    output = cfg.output or str(pipeline.default_output())
    name = cfg.run_name or trainer.new_run_name(output)
    storage.check_new_output(output)  # the best run writes it after the search: refused before, not after
    source, workers, concurrent, uri = _checked(cfg, name)
    training = source.prepare(validation=True)
    print(f"searching {cfg.trials} settings on {training.num_train:,} {training.unit} (validation: "
          f"{training.validation.num_rows:,}), {concurrent} trial(s) at a time of {workers.describe()}, up to "
          f"{cfg.epochs} epoch(s) each", flush=True)
    path = f"{storage.checkpoint_storage(cfg.storage_path).rstrip('/')}/{name}"
    resuming = _search_tracker(cfg, name, path, uri, training.identity)
    with tracking.ended_on_failure(TRACKING["search"]):
        table = _search(cfg, name, path, resuming, concurrent, workers, training)
        best, accuracy = _best(table, name)
        print(f"best settings, validation accuracy {accuracy:.4f}: {describe(best)}; training them as a run",
              flush=True)
        search = TRACKING["search"]
        if search is not None:
            search.metrics({"best_val_accuracy": accuracy})
        # The final run sizes itself to the cluster as jobs/train.py does, on all the training data.
        final = dataclasses.replace(base_config(cfg), **best, output=output, run_name=f"{name}-best", tracking_uri=uri,
                                    ray_logs=cfg.ray_logs, num_workers=None, cpus_per_worker=None)
        result = pipeline.run(final, extras={"trials.csv": table.to_csv(index=False, quoting=csv.QUOTE_MINIMAL).encode()},
                              tracking_parent=search.run_id if search else None,
                              read=(source, training.without_validation()))
    if search is not None:
        search.end()
    ray.shutdown()  # the job's Ray (or its connection): session.exit_now finds it stopped
    return str(result.output), table


def _search_tracker(cfg: TuneConfig, name: str, path: str, uri: str | None, identity: str) -> bool:
    """Whether the search resumes; with tracking, its MLflow run (a resumed search continues it)."""
    from ray import tune

    resuming = tune.Tuner.can_restore(path)
    if uri:
        TRACKING["search"] = tracking.Tracker.start(
            uri, "tune.py", name, run_id=tracking.find_run(uri, name, "search") if resuming else None,
            tags={"clf.kind": "search", "clf.data": identity})
        TRACKING["search"].params({k: v for k, v in dataclasses.asdict(cfg).items() if k != "tracking_uri"})
    return resuming


def _search(cfg: TuneConfig, name: str, path: str, resuming: bool, concurrent: int, workers: plan.TrainPlan,
            training) -> object:
    """The trials, run by Tune: their table (`trials_table`). Interrupted raised on Ctrl-C."""
    from ray import tune

    base = dataclasses.asdict(base_config(cfg, run_name=name, validation=True))
    # The trial itself holds no CPU (only a byte of memory, as Tune asks for something): its workers hold them.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, rows=training.rows, workers=dataclasses.asdict(workers)),
        {"CPU": 0, "memory": 1})
    results, interrupted = ray_train.tune_fit(_tuner(cfg, name, path, trainable, concurrent, resuming))
    if interrupted:
        for child in TRACKING["trials"].values():
            child.end("KILLED")  # the trials under way: a resumed search runs them again
        raise Interrupted(f"interrupted: search {name} keeps its state in {path}; start it again with "
                          f"--run-name {name} (and the same settings) to resume it")
    return trials_table(results, cfg.epochs)


def _best(table, name: str) -> tuple[dict, float]:
    """The settings of the best finished trial, and its validation accuracy."""
    finished = table[table["error"] == ""].dropna(subset=["val_accuracy"])
    if finished.empty:
        raise ClfError(f"no trial of search {name} finished: {table['error'].iloc[0]}")
    best = {k: (int(v) if k == "batch_size" else float(v)) for k, v in finished.iloc[0][list(SPACE)].items()}
    return best, float(finished.iloc[0]["val_accuracy"])
