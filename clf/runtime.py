"""Everything Ray-the-process, and the only module that knows Ray's process-level quirks.

- connect(): join RAY_ADDRESS or start an embedded Ray that listens on loopback only;
- cluster_nodes(): the cluster's resources per alive node; plan_*(): pure functions from settings and
  nodes to a fully resolved plan (no None left), unit-tested without Ray;
- storage_uri(), refuse_unseen(): Ray Train's checkpoint storage, and whether a local path is seen by
  every node (on a real cluster no two nodes share a disk);
- default_output(), new_run_name(): a run's names;
- the work-arounds around Ray Train's fit() (health checks, the Ctrl-C handler it leaves behind, how its
  errors become ours), each with the reason and the Ray version it was checked against (2.60).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import secrets
import signal
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import ray
import ray._private.ray_constants
import ray._private.state
import ray._private.worker
import yaml
import ray.data
import ray.exceptions
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import RayTrainError  # Ray Train's own failures (2.60: not public)

from clf import console
from clf.config import TagConfig, TrainConfig
from clf.errors import ClfError, ConfigError, first_line

# --- Connecting ------------------------------------------------------------------------------------------

# Ray swaps 127.0.0.1 for the machine's outward address, and binds its servers to every interface, unless
# it runs in its single-machine mode (the one it uses on macOS and Windows). Ray 2.60 reads this variable
# once, when `ray` is imported, into `ray_constants.ENABLE_RAY_CLUSTER`; connect() sets both, so the order
# of imports does not matter, and the processes Ray starts inherit the variable.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# The dashboard is started (on loopback) because it serves the state API Ray Train's clean-up relies on.
LOCAL_RAY = dict(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")


# Ray Train (2.60) starts a PreemptionWatcher actor beside the workers of every run: it polls for nodes being
# drained (a cloud's spot node reclaimed, an autoscaler scaling down) so the workers there can checkpoint in
# time. A Ray this process starts on its own machine has no such nodes; the watcher would cost one more
# process starting beside the training worker and its wake-ups all through training. Ray Train passes the
# variable on to its controller.
EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def loopback_mode() -> None:
    """Make every Ray server this process starts listen on 127.0.0.1 (see LOOPBACK_ENV)."""
    os.environ.update(LOOPBACK_ENV)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def connect(ray_logs: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start an embedded local Ray. Ray's
    own console lines off unless `ray_logs` (`clf.console.quiet_ray`)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    else:
        loopback_mode()
        for key, value in EMBEDDED_ENV.items():
            os.environ.setdefault(key, value)
    quiet = console.quiet_ray(ray_logs)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # "local" even when a `ray start` cluster runs on this machine: joining one is asked for
            # explicitly, with RAY_ADDRESS.
            ray.init(**LOCAL_RAY, **quiet)
    except Exception as e:  # Ray raises plain Exception for a dashboard that does not start (2.60)
        ray.shutdown()  # stop whatever part of a local Ray did start
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ClfError(f"could not start or join {where}: {first_line(e)}") from None
    console.quiet_ray_data(ray_logs)
    if not ray_logs:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # this machine's Ray session's logs
        console.native_stderr_to(os.path.join(logs, f"clf-driver-{os.getpid()}.err"))


def disconnect() -> None:
    """Stop the embedded Ray (every process of it), or leave the cluster this process joined."""
    ray.shutdown()


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


# --- Resources and the plan ------------------------------------------------------------------------------

# More nodes than an autoscaler will ever start in one group, for groups without a limit.
UNBOUNDED = 1000


@dataclass(frozen=True)
class Node:
    """One alive node's whole CPUs and GPUs."""

    cpus: int
    gpus: int = 0
    node_id: str = ""


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one shape that an autoscaler may run, up to `max_count` of them."""

    cpus: int
    gpus: int
    max_count: int


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]  # alive now
    # What an autoscaler may run (Ray's cluster config, or the cluster launcher's); None: nothing can grow.
    groups: tuple[NodeGroup, ...] | None = None

    def largest(self) -> list[Node]:
        """The cluster at its largest: every group at its maximum, or as it is now if that is more."""
        if not self.groups:
            return list(self.nodes)
        grown = [Node(g.cpus, g.gpus) for g in self.groups for _ in range(min(g.max_count, UNBOUNDED))]
        return grown if len(grown) >= len(self.nodes) else list(self.nodes)

    def describe(self) -> str:
        shapes = ", ".join(f"{n.cpus} CPU" + (f" + {n.gpus} GPU" if n.gpus else "") for n in self.nodes)
        return f"{len(self.nodes)} node(s): {shapes}"


@dataclass(frozen=True)
class TrainPlan:
    num_workers: int
    min_workers: int  # equal to num_workers unless the run is elastic
    cpus_per_worker: int
    use_gpu: bool
    placement: str = "PACK"  # Ray's placement group strategy for the workers
    waits_for_nodes: bool = False  # more than the nodes up now hold: the autoscaler must add some

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.num_workers

    def describe(self) -> str:
        return f"{self.num_workers} worker(s) x {self.cpus_per_worker} CPU{' + 1 GPU' if self.use_gpu else ''}"


@dataclass(frozen=True)
class InferPlan:
    num_actors: int
    cpus_per_actor: float  # whole CPUs, which are also the actor's torch threads
    use_gpu: bool


def holds(nodes, cpus: int, gpus: int = 0) -> int:
    """How many workers of `cpus` CPUs (and `gpus` GPUs) each the nodes hold, none split across nodes."""
    return sum(min(n.cpus // cpus, n.gpus // gpus if gpus else n.cpus) for n in nodes)


def _default_cpu_worker(nodes) -> int:
    """CPUs per worker when nothing is asked: the largest equal size that still uses at least 3/4 of the
    cluster's CPUs. One node: one worker with all of it; nodes alike: one worker per node; a small head
    beside big workers: the head is left out rather than every worker cut to its size."""
    sizes = sorted({n.cpus for n in nodes if n.cpus > 0}, reverse=True)
    best = max(size * holds(nodes, size) for size in sizes)
    return next(size for size in sizes if size * holds(nodes, size) * 4 >= best * 3)


def _worker_size(cfg: TrainConfig, nodes: list[Node], largest: list[Node]) -> tuple[int, int]:
    """(workers, CPUs each) from the settings, sized on the nodes that are up; where none of them has a CPU
    (a KubeRay head with num-cpus 0 beside worker groups scaled to zero), on what the autoscaler may add."""
    cpus_up = any(n.cpus for n in nodes)
    sizing = nodes if cpus_up else largest
    if cfg.use_gpu:
        if not any(n.gpus for n in largest):
            raise ConfigError(
                "--use-gpu was given but the Ray cluster has no GPU (and no autoscaler that can add one)"
            )
        # The GPU does the arithmetic; a thread or two keeps it fed from the in-memory shard.
        return cfg.num_workers or max(1, sum(n.gpus for n in nodes)), cfg.cpus_per_worker or 1
    if cfg.cpus_per_worker:
        return cfg.num_workers or max(1, holds(nodes, cfg.cpus_per_worker)), cfg.cpus_per_worker
    if cfg.num_workers:
        fitting = [c for c in range(1, max(n.cpus for n in sizing) + 1) if holds(sizing, c) >= cfg.num_workers]
        return cfg.num_workers, max(fitting, default=1)
    if cpus_up:
        cpus_per_worker = _default_cpu_worker(nodes)
        return holds(nodes, cpus_per_worker), cpus_per_worker
    # Nothing to size on but what may come: one worker, on the largest node the autoscaler may add.
    return 1, max(n.cpus for n in largest)


def plan_training(cfg: TrainConfig, cluster: Cluster) -> TrainPlan:
    """Workers and CPUs each, from the settings and the cluster's nodes; refuses what cannot fit, and
    waits (a bounded wait: Ray Train's placement tries) only where an autoscaler can add what is missing."""
    nodes, largest = list(cluster.nodes), cluster.largest()
    if not any(n.cpus for n in largest):
        raise ConfigError(f"the Ray cluster has no CPU for the training workers ({cluster.describe()})")
    gpus = 1 if cfg.use_gpu else 0
    num_workers, cpus_per_worker = _worker_size(cfg, nodes, largest)
    min_workers = cfg.min_workers or num_workers
    if min_workers > num_workers:
        raise ConfigError(f"--min-workers {min_workers} is more than the {num_workers} workers of the run")
    plan = TrainPlan(num_workers, min_workers, cpus_per_worker, cfg.use_gpu,
                     # CPU workers compete for their node's cores and memory bandwidth: one per node where
                     # they can; GPU workers gain from sharing a node (NVLink, shared memory).
                     placement="PACK" if cfg.use_gpu else "SPREAD")
    if holds(nodes, cpus_per_worker, gpus) >= min_workers:  # an elastic run starts with what fits
        return plan
    if cluster.groups and holds(largest, cpus_per_worker, gpus) >= num_workers:
        return dataclasses.replace(plan, waits_for_nodes=True)
    if cfg.use_gpu and holds(largest, 1, 1) < num_workers:
        raise ConfigError(f"--num-workers {min_workers} with --use-gpu needs {min_workers} GPUs; the cluster "
                          f"has {sum(n.gpus for n in largest)}{' at its largest' if cluster.groups else ''}")
    raise ConfigError(
        f"{min_workers} worker(s) x {cpus_per_worker} CPU{' + 1 GPU' if gpus else ''} do not fit on "
        f"{'the largest cluster the autoscaler may run' if cluster.groups else 'the cluster'} "
        f"({Cluster(tuple(largest)).describe()}), which holds {holds(largest, cpus_per_worker, gpus)}; "
        "no worker is split across nodes"
    )


def cluster_nodes() -> Cluster:
    """The connected cluster: its alive nodes and what an autoscaler may add."""
    nodes = tuple(
        Node(int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)), n["NodeID"])
        for n in ray.nodes()
        if n.get("Alive")
    )
    # An embedded Ray is this process's own: nothing grows it, whatever launcher file lies on the machine.
    return Cluster(nodes, autoscaler_groups(LAUNCHER_CONFIG if os.environ.get("RAY_ADDRESS") else None))


# Where `ray up` leaves its copy of the cluster YAML on the head node.
LAUNCHER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"


def autoscaler_groups(launcher_config: Path | None = LAUNCHER_CONFIG) -> tuple[NodeGroup, ...] | None:
    """The node groups an autoscaler of this cluster may run, or None where nothing can grow.

    Two sources, checked against Ray 2.60: the cluster config an autoscaler reports to the GCS (autoscaler
    v2, KubeRay's in-tree autoscaler; Ray Train reads the same to refuse workers that can never fit), read
    through Ray's private `state.get_cluster_config()`; and the cluster launcher's own copy of the cluster
    YAML on the head node, `launcher_config` (`ray up` writes it to ~/ray_bootstrap_config.yaml, with the
    instance types' CPUs and GPUs filled in), where jobs submitted to the head run; None: not looked for.
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


def launcher_groups(config: dict) -> tuple[NodeGroup, ...]:
    """The node groups of a cluster-launcher config: the head, and each worker type up to its max_workers
    (and the cluster's max_workers in all)."""
    cap = config.get("max_workers", UNBOUNDED)
    groups = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources") or {}
        count = 1 if name == config["head_node_type"] else min(node_type.get("max_workers", cap), cap)
        groups.append(NodeGroup(int(resources.get("CPU", 0)), int(resources.get("GPU", 0)), count))
    return tuple(groups)


def _cpus_up(cluster: Cluster, what: str) -> int:
    """The CPUs of the nodes up now; ConfigError where there are none and no autoscaler can add one. (None
    up but some to come: Ray places the work once the autoscaler has added a node for it.)"""
    cpus = sum(n.cpus for n in cluster.nodes)
    if cpus == 0 and not any(n.cpus for n in cluster.largest()):
        raise ConfigError(f"the Ray cluster has no CPU for {what} ({cluster.describe()})")
    return cpus


def _pool(asked: int | None, available: int, batches: int, cpus_per_actor: float, use_gpu: bool) -> InferPlan:
    """A pool sized to the work: as many actors as asked for; else one per CPU (or GPU) or one per batch,
    whichever is fewer: a thousand CPUs do not start a thousand actors, each importing torch, for ten
    batches. Fixed, not Ray Data's autoscaling pool: measured on 2 CPUs, a pool growing from one actor took
    the same time for 10,000 test images (4.8-5.2 s; it kept to one actor), and tagged 20,000 photos at 821
    photos/s against 868 after the first batch (its second actor started late)."""
    return InferPlan(asked or max(1, min(available, batches)), cpus_per_actor, use_gpu)


def plan_inference(cfg: TrainConfig, cluster: Cluster, rows: int) -> InferPlan:
    """Inference actors for `rows` evaluation images, from the cluster as it is now (after training: a node
    may be gone)."""
    batches = -(-rows // cfg.infer_batch_size)
    if cfg.use_gpu:
        return _pool(cfg.num_infer_actors, sum(n.gpus for n in cluster.nodes), batches, 0, True)
    # Single-threaded actors: faster than fewer multi-threaded ones for a model this small.
    return _pool(cfg.num_infer_actors, _cpus_up(cluster, "the inference actors"), batches, 1, False)


def plan_tagging(cfg: TagConfig, cluster: Cluster, files: int) -> InferPlan:
    """Predictor actors for `files` photos. On CPUs each actor also reads and decodes its photos (Ray Data
    fuses the reading tasks into the actors, their resources being the same: one CPU), one actor per CPU:
    decoding is 20-30 times the work of predicting. With GPUs, CPU tasks read and decode, and the GPU actors
    predict."""
    batches = -(-files // cfg.batch_size)
    if cfg.use_gpu:
        if not any(n.gpus for n in cluster.largest()):
            raise ConfigError("--use-gpu was given but the Ray cluster has no GPU (and no autoscaler that can add one)")
        return _pool(cfg.num_actors, sum(n.gpus for n in cluster.nodes), batches, 0, True)
    # None up but an autoscaler can add one: one actor, once it has.
    return _pool(cfg.num_actors, max(1, _cpus_up(cluster, "the predictor actors")), batches, 1, False)


# --- Ray Data -------------------------------------------------------------------------------------------


def whole_cluster(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """`dataset` executed without Ray Data's per-operator resource reservation. Ray Data 2.60 keeps a share
    of the cluster's CPUs reserved for each operator of a pipeline (`op_resource_reservation_ratio`, 0.5),
    which keeps a pipeline of several operators from deadlocking; a pass of one map stage (reading and
    converting photos) then ran 1.2-1.3 tasks at a time on 2 CPUs instead of 1.9: 2,000 photos in 3.5-4.7 s
    against 2.5 s without it (2-core VM). Only for datasets whose work is one stage."""
    dataset.context.op_resource_reservation_enabled = False
    return dataset


def materialize(dataset: ray.data.Dataset, progress: console.Progress) -> ray.data.MaterializedDataset:
    """`dataset.materialize()`, counting its rows into `progress` as its blocks are made (in the dataset's
    order). The blocks stay where they were made; the driver holds their references only."""
    refs = []
    for bundle in dataset.iter_internal_ref_bundles():
        rows = sum(entry.metadata.num_rows for entry in bundle.blocks)
        if rows != bundle.num_rows():  # a bundle of parts of blocks: not what a map of whole blocks makes
            raise ClfError(f"Ray Data gave a bundle of {bundle.num_rows()} rows in blocks of {rows}")
        refs.extend(bundle.block_refs)
        progress.update(rows)
    return ray.data.from_arrow_refs(refs)


# --- Names and storage -----------------------------------------------------------------------------------


# Ray Train's own default storage (ray.train.constants.DEFAULT_STORAGE_PATH in 2.60; a test checks they agree),
# which a run checks like any other before it starts.
DEFAULT_STORAGE = "~/ray_results"


def storage_uri(storage_path: str | None) -> str:
    """Ray Train's checkpoint storage as an absolute path or a URI (s3://, gs://)."""
    location = storage_path or DEFAULT_STORAGE
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


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


# A task on each node starts a worker process there: seconds, not minutes, unless a node is overloaded.
NODE_CHECK_TIMEOUT_S = 120


def _all_exist(paths: list[str]) -> bool:
    return all(os.path.exists(p) for p in paths)


def default_output(now: datetime | None = None) -> Path:
    return Path("runs") / (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


def new_run_name(output: str) -> str:
    """A run name never used before: a new run must never resume an earlier one by accident."""
    return f"{posixpath.basename(output.rstrip('/')) or 'run'}-{secrets.token_hex(3)}"


# --- Ray Train's fit() -----------------------------------------------------------------------------------

# The controller checks on the workers this often (Ray's default: 2 s). The end of training is noticed at
# the next check, so on short runs the default adds a second on average. Ray Train passes the variable from
# the driver to the controller and the workers.
HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

# After a failure a run of fixed size waits for all its workers to be placed again; each wait lasts
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default 60 s) and counts as a controller failure. This many
# (about ten minutes: time for an autoscaler to bring a replacement node) and the run fails with a clear
# message instead of waiting for ever on a cluster that will not grow. Ray's default: no limit.
PLACEMENT_WAITS = 10


def prepare_fit() -> None:
    for key, value in HEALTH_CHECK_ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def ctrl_c_kept():
    """Ray Train's fit() (2.60) installs a Ctrl-C handler that holds the controller actor's handle and stays
    after fit() returns, which keeps the finished controller (about 0.4 GiB) alive through inference;
    putting the previous handler back lets Ray end it, and Ctrl-C after training means what it did before."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if before is not None and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before)


def training_failure(error: Exception) -> Exception:
    """What a failed fit() means, decided by the original exception's type: a ClfError for the failures we
    expect (a ClfError raised in a worker, a worker that died past --max-failures, workers Ray could not
    place), else `error` itself, a bug to show with its traceback (Ray's message carries the worker's)."""
    if isinstance(error, ControllerError):
        failure = error.controller_failure
        # Ray 2.60 names the "could not place the workers again" failure only by this private class.
        if type(failure).__name__ == "WorkerGroupStartupTimeoutError":
            return ClfError(
                f"training failed: after a failure, {failure.num_workers} workers could not be placed again "
                f"in {PLACEMENT_WAITS + 1} tries (a node lost for good?); with --min-workers a run goes on "
                "with the workers that fit"
            )
        return ClfError(f"training failed: {first_line(failure)}")
    if isinstance(error, WorkerGroupError):
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, ClfError):
                return type(failure)(f"training failed on worker {rank}: {first_line(failure)}")
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, (ray.exceptions.RayError, RayTrainError)):  # a dead actor, a failed health check
                return ClfError(f"training failed: worker {rank} died ({first_line(failure)})")
    return error
