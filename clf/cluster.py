"""The connected cluster: its nodes, what of them is free, what an autoscaler may add, and whether every node
sees a path on the driver's disk. `clf.plan` decides from what these read.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
import ray.exceptions
import yaml

from clf import ray_private, session
from clf.errors import ClfError, ConfigError, first_line
from clf.plan import UNBOUNDED, Cluster, Node, NodeGroup, launcher_groups

# Where `ray up` leaves its copy of the cluster YAML on the head node.
LAUNCHER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"


def cluster_nodes() -> Cluster:
    """The connected cluster: its alive nodes, what of them is free now, and what an autoscaler may add."""
    free = ray_private.free_resources_per_node()  # node id -> resources no task, actor or group holds
    nodes = tuple(
        Node(int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)), n["NodeID"],
             int(free.get(n["NodeID"], {}).get("CPU", 0)), int(free.get(n["NodeID"], {}).get("GPU", 0)))
        for n in ray.nodes()
        if n.get("Alive")
    )
    # An embedded Ray is this process's own: nothing grows it, whatever launcher file lies on the machine.
    return Cluster(nodes, None if session.embedded() else autoscaler_groups(LAUNCHER_CONFIG))


def autoscaler_groups(launcher_config: Path | None = LAUNCHER_CONFIG) -> tuple[NodeGroup, ...] | None:
    """The node groups an autoscaler of this cluster may run, or None where nothing can grow.

    Two sources: the cluster config an autoscaler reports to the GCS (autoscaler v2, KubeRay's in-tree
    autoscaler; Ray Train reads the same to refuse workers that can never fit), read through Ray's private
    `state.get_cluster_config()` (`clf.ray_private`); and the cluster launcher's own copy of the cluster YAML on the head node,
    `launcher_config` (`ray up` writes it to ~/ray_bootstrap_config.yaml, with the instance types' CPUs and
    GPUs filled in), where jobs submitted to the head run; None: not looked for.
    """
    config = ray_private.autoscaler_config()
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
    waiting = ray_private.actors_pending_creation()
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
