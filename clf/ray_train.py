"""Ray Train's and Ray Tune's adjustments: the TorchTrainer with our Ctrl-C and without the processes an embedded
Ray never uses, the placement groups a search's stopped trials leave, and Tune's console. Each says why, checked
against Ray 2.60; Ray's private parts are reached through `clf.ray_private`.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager

from ray.train.torch import TorchTrainer

from clf import ray_private, session
from clf.noticeboard import Noticeboard



DatasetsCallback, PlacementGroupCleanerCallback, WorkerGroupCallback = ray_private.train_callbacks()


class PostPlacementGroup(WorkerGroupCallback):
    """Posts the workers' placement group on the noticeboard under `placement_group_key(run name)`: a Tune trial
    that Tune stops (ASHA, or its last epoch) is killed with its controller, which leaves the group and its CPUs
    taken until the job ends; the search's driver removes it (`remove_placement_groups`)."""

    def __init__(self, run_name: str):
        self.board = Noticeboard(placement_group_key(run_name))

    def after_worker_group_start(self, worker_group):
        self.board.post({"id": ray_private.worker_group_placement_group(worker_group).id.hex()})


class Trainer(TorchTrainer):
    """Ray Train's TorchTrainer with these changes to what its fit() does (Ray 2.60):

    - Ctrl-C: Ray's handler aborts the run and calls sys.exit(0) from the signal handler, which ends the
      driver with exit code 1 and not a line of ours (its own comment: "for some reason the process still
      exits with 1"). Ours asks the controller to abort without waiting and raises KeyboardInterrupt in the
      driver, which fit()'s caller turns into its message; a second Ctrl-C raises at once.
    - In an embedded Ray, no PlacementGroupCleaner: a detached actor per run that polls the dashboard's state
      API every second to remove the run's placement group if the controller dies while the cluster lives
      on. An embedded Ray ends with the driver, and has no dashboard unless asked for.
    - Without `datasets=`, no DatasetManager: Ray Train starts that actor for every run, datasets or none
      (our workers fetch their rows themselves, `clf.data.Blocks`).
    - With `post_placement_group` (a Tune trial's run), PostPlacementGroup.
    """

    def __init__(self, *args, post_placement_group: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.post_placement_group = post_placement_group

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if session.embedded():
            callbacks = [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        if self.post_placement_group:
            callbacks.append(PostPlacementGroup(self.run_config.name))
        return callbacks

    def _register_sigint_handler(self, controller):
        def handler(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
            controller.abort.remote()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)


@contextmanager
def ctrl_c_kept():
    """Put the Ctrl-C handler back as it was once fit() is done: the one fit() installs holds the controller
    actor's handle, which keeps the finished controller (hundreds of MB) alive through inference, and Ctrl-C
    after training means what it did before."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if before is not None and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before)


def placement_group_key(run_name: str) -> str:
    return f"placement-group/{run_name}"


def remove_placement_groups(prefix: str) -> None:
    """Remove the placement groups still there of the training runs whose names start with `prefix` (see
    PostPlacementGroup), and their notes."""
    from ray.util.placement_group import placement_group_table
    from ray.util.placement_group import remove_placement_group as remove

    for key in Noticeboard.keys(placement_group_key(prefix)):
        board = Noticeboard(key)
        if posted := board.read():
            group = ray_private.placement_group(posted["id"])
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove(group)
        board.remove()


# Ray Tune (2.60) prints its own progress (a configuration box, trial tables, where to find results and how to
# start TensorBoard) whatever `verbose` says, unless its older output engine is chosen; and it writes a CSV,
# JSON and TensorBoard log of every trial unless told not to. The job prints its own lines, and keeps what it
# needs (trials.csv).
TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def quiet_tune(ray_logs: bool) -> None:
    """Before Tune starts: its console lines and per-trial loggers off unless `ray_logs` (see TUNE_ENV)."""
    if not ray_logs:
        os.environ.update(TUNE_ENV)
        logging.getLogger("ray.tune").setLevel(logging.ERROR)


def tune_fit(tuner):
    """(tuner.fit()'s results, whether Ctrl-C interrupted it). On Ctrl-C Tune saves the search's state, stops
    its trials and returns as if done, marking the stopped trials TERMINATED like finished ones (Ray 2.60); the
    one trace is that its SIGINT handler, installed for the search, has put the one it found back."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results = tuner.fit()
    interrupted = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return results, interrupted


