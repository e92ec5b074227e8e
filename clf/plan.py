"""What runs where: pure functions from the settings and the cluster's nodes to a fully resolved plan (how
many training workers of how many CPUs, how many predictor actors), refusing what cannot fit. No Ray here:
`clf.cluster.cluster_nodes()` reads the cluster, these decide, and the tests check them on made-up clusters.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from clf.config import ServeConfig, TagConfig, TrainConfig
from clf.errors import ClfError, ConfigError

# More nodes than an autoscaler will ever start in one group, for groups without a limit.
UNBOUNDED = 1000


def placement_tries() -> int:
    """How many times Ray Train tries to place a run's workers before the run fails with a clear message instead
    of waiting for ever on a cluster that will not grow (Ray's default: no limit): after a failure, a run of
    fixed size waits for all its workers again, and a run at its start waits for the autoscaler. Each try lasts
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default 60 s). CLF_PLACEMENT_TRIES, else 11: about eleven
    minutes, time for an autoscaler to bring a replacement node."""
    value = os.environ.get("CLF_PLACEMENT_TRIES", "11")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"CLF_PLACEMENT_TRIES={value}: expected a whole number of tries, at least 1")
    return int(value)


@dataclass(frozen=True)
class Node:
    """One alive node's whole CPUs and GPUs, and how many of them no other work holds now."""

    cpus: int
    gpus: int = 0
    node_id: str = ""
    free_cpus: int | None = None  # None: all of them (a made-up node, or one an autoscaler would add)
    free_gpus: int | None = None

    def free(self) -> Node:
        """The node as far as it is free now."""
        return Node(self.cpus if self.free_cpus is None else self.free_cpus,
                    self.gpus if self.free_gpus is None else self.free_gpus, self.node_id)


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

    def free(self) -> list[Node]:
        return [n.free() for n in self.nodes]

    def is_busy(self) -> bool:
        """Whether other work holds some of the nodes' CPUs or GPUs now."""
        return self.free() != [Node(n.cpus, n.gpus, n.node_id) for n in self.nodes]

    def describe(self) -> str:
        return f"{len(self.nodes)} node(s): {_shapes(self.nodes)}"

    def describe_free(self) -> str:
        return f"free now: {_shapes(self.free())} (the rest held by other work)"


def _shapes(nodes) -> str:
    return ", ".join(f"{n.cpus} CPU" + (f" + {n.gpus} GPU" if n.gpus else "") for n in nodes)


@dataclass(frozen=True)
class TrainPlan:
    num_workers: int
    min_workers: int  # equal to num_workers unless the run is elastic
    cpus_per_worker: int
    use_gpu: bool
    placement: str = "PACK"  # Ray's placement group strategy for the workers
    waits_for_nodes: bool = False  # more than the nodes up now hold: the autoscaler must add some
    sized_to_free: bool = False  # other work held part of the cluster: sized to what was free

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
    """(workers, CPUs each) from the settings, sized on what is free of the nodes that are up (`nodes`); where none
    of them has a CPU free (a KubeRay head with num-cpus 0 beside worker groups scaled to zero), on what the
    autoscaler may add."""
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
    """Workers and CPUs each, from the settings and what is free of the cluster's nodes now; refuses what cannot
    fit, or cannot be placed now, and waits (a bounded wait: Ray Train's placement tries) only where an
    autoscaler can add what is missing."""
    free, largest = cluster.free(), cluster.largest()
    if not any(n.cpus for n in largest):
        raise ConfigError(f"the Ray cluster has no CPU for the training workers ({cluster.describe()})")
    gpus = 1 if cfg.use_gpu else 0
    num_workers, cpus_per_worker = _worker_size(cfg, free, largest)
    min_workers = cfg.min_workers or num_workers
    if min_workers > num_workers:
        raise ConfigError(f"--min-workers {min_workers} is more than the {num_workers} workers of the run")
    plan = TrainPlan(num_workers, min_workers, cpus_per_worker, cfg.use_gpu,
                     # CPU workers compete for their node's cores and memory bandwidth: one per node where
                     # they can; GPU workers gain from sharing a node (NVLink, shared memory).
                     placement="PACK" if cfg.use_gpu else "SPREAD", sized_to_free=cluster.is_busy())
    if holds(free, cpus_per_worker, gpus) >= min_workers:  # an elastic run starts with what fits
        return plan
    if cluster.groups and holds(largest, cpus_per_worker, gpus) >= num_workers:
        return dataclasses.replace(plan, waits_for_nodes=True)
    if cfg.use_gpu and holds(largest, 1, 1) < num_workers:
        raise ConfigError(f"--num-workers {min_workers} with --use-gpu needs {min_workers} GPUs; the cluster "
                          f"has {sum(n.gpus for n in largest)}{' at its largest' if cluster.groups else ''}")
    asked = f"{min_workers} worker(s) x {cpus_per_worker} CPU{' + 1 GPU' if gpus else ''}"
    if holds(largest, cpus_per_worker, gpus) >= min_workers:  # they fit the cluster, not what other work leaves
        raise ClfError(f"{asked} cannot be placed now: the cluster has {cluster.describe()}, "
                       f"{cluster.describe_free()}; no worker is split across nodes")
    raise ConfigError(
        f"{asked} do not fit on "
        f"{'the largest cluster the autoscaler may run' if cluster.groups else 'the cluster'} "
        f"({Cluster(tuple(largest)).describe()}), which holds {holds(largest, cpus_per_worker, gpus)}; "
        "no worker is split across nodes"
    )


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
    batches. Fixed, not Ray Data's autoscaling pool, which was no faster and started its second actor late
    (docs/performance.md)."""
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
    # None up but an autoscaler can add one: one actor, once it has. Sized to what is free now (actors beyond it
    # would wait for CPUs other work holds; the pool tags with the ones it has).
    _cpus_up(cluster, "the predictor actors")
    return _pool(cfg.num_actors, max(1, sum(n.cpus for n in cluster.free())), batches, 1, False)


@dataclass(frozen=True)
class ServePlan:
    """What each replica of the endpoint holds, and whether the autoscaler must add a node for the first ones."""

    cpus: int
    gpus: int
    waits_for_nodes: bool = False

    def describe(self) -> str:
        return f"{self.cpus} CPU{' + 1 GPU' if self.gpus else ''}"


def plan_serving(cfg: ServeConfig, cluster: Cluster) -> ServePlan:
    """The replicas' resources; refuses a GPU that no node has or an autoscaler can add, and replicas no node can
    hold. Whether they can be placed among what other work holds is Serve's to find out (a redeploy's replicas
    replace the running ones): `clf.deploy` gives it a deadline."""
    gpus = 1 if cfg.use_gpu else 0
    largest = cluster.largest()
    if cfg.use_gpu and not any(n.gpus for n in largest):
        raise ConfigError("--use-gpu was given but the Ray cluster has no GPU (and no autoscaler that can add one)")
    plan = ServePlan(cfg.cpus_per_replica, gpus)
    needed = max(1, cfg.min_replicas)
    if holds(largest, plan.cpus, gpus) < needed:
        raise ConfigError(
            f"{needed} replica(s) of {plan.describe()} do not fit on "
            f"{'the largest cluster the autoscaler may run' if cluster.groups else 'the cluster'} "
            f"({Cluster(tuple(largest)).describe()}); no replica is split across nodes"
        )
    return dataclasses.replace(plan, waits_for_nodes=holds(cluster.nodes, plan.cpus, gpus) < needed)
