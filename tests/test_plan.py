"""The plan on made-up clusters: workers and CPUs each, predictor actors, what cannot fit, what waits for an
autoscaler. Pure functions: no Ray here."""

import re

import pytest
import yaml

from clf.config import ServeConfig, TagConfig, TrainConfig
from clf.errors import ClfError, ConfigError
from clf.plan import (
    Cluster, InferPlan, Node, NodeGroup, ServePlan, TrainPlan, launcher_groups, plan_inference, plan_serving,
    placement_tries, plan_tagging, plan_training,
)
from tests.helpers import ROOT


def cluster(*nodes: Node, groups=None) -> Cluster:
    return Cluster(tuple(nodes), groups)


LAPTOP = cluster(Node(cpus=2))
BIG_BOX = cluster(Node(cpus=16))
ONE_GPU = cluster(Node(cpus=8, gpus=1))
THREE_NODES = cluster(Node(4), Node(4), Node(4))
SMALL_HEAD_TWO_GPU_NODES = cluster(Node(1), Node(8, 1), Node(8, 1))
# cluster.yaml: an m5.xlarge head (4 vCPUs) and the one g5.xlarge GPU node it keeps up (4 vCPUs, 1 GPU)...
LAUNCHER_NODES = (Node(4), Node(4, 1))
# ...and, where its autoscaler runs, up to 8 GPU nodes (its launcher config on the head says so).
LAUNCHER_GROUPS = (NodeGroup(4, 0, 1), NodeGroup(4, 1, 8))
CLUSTER_YAML_FIXED = cluster(*LAUNCHER_NODES)
CLUSTER_YAML_AUTOSCALING = cluster(*LAUNCHER_NODES, groups=LAUNCHER_GROUPS)
# k8s/rayjob.yaml: a head with num-cpus 0, its GPU worker group scaled to zero (up to 8 pods of 4 CPUs + 1 GPU).
KUBERAY_EMPTY = cluster(Node(0), groups=(NodeGroup(0, 0, 1), NodeGroup(4, 1, 8)))
KUBERAY_GPU_GROUP_UP = cluster(Node(0), Node(4, 1), groups=(NodeGroup(0, 0, 1), NodeGroup(4, 1, 8)))
# A head with no CPU and nothing that can grow: nowhere to run.
NO_CPU = cluster(Node(0))


def cpu(num_workers, cpus_per_worker, min_workers=None):
    return TrainPlan(num_workers, min_workers or num_workers, cpus_per_worker, False, "SPREAD")


def gpu(num_workers, min_workers=None, waits=False):
    return TrainPlan(num_workers, min_workers or num_workers, 1, True, "PACK", waits)


@pytest.mark.parametrize(
    "settings, nodes, plan",
    [
        ({}, LAPTOP, cpu(1, 2)),  # one worker using every core
        ({}, BIG_BOX, cpu(1, 16)),
        ({"num_workers": 2}, LAPTOP, cpu(2, 1)),
        ({"num_workers": 4, "cpus_per_worker": 2}, BIG_BOX, cpu(4, 2)),
        ({"use_gpu": True}, ONE_GPU, gpu(1)),  # one per GPU, a CPU to feed it
        ({"num_workers": 2, "min_workers": 1}, LAPTOP, cpu(2, 1, min_workers=1)),  # elastic
        # Elastic with more than fits now: it starts with what fits, down to its minimum.
        ({"num_workers": 4, "min_workers": 2, "cpus_per_worker": 1}, LAPTOP, cpu(4, 1, min_workers=2)),
        ({"num_workers": 3, "min_workers": 1, "use_gpu": True}, ONE_GPU, gpu(3, min_workers=1)),
        # Several nodes: a worker never spans nodes; without flags, one worker per node sized to it.
        ({}, THREE_NODES, cpu(3, 4)),
        ({"num_workers": 3}, THREE_NODES, cpu(3, 4)),
        ({"num_workers": 6}, THREE_NODES, cpu(6, 2)),
        ({"cpus_per_worker": 2}, THREE_NODES, cpu(6, 2)),
        ({}, SMALL_HEAD_TWO_GPU_NODES, cpu(2, 8)),  # not 17 one-CPU workers to use the head's one CPU
        ({"use_gpu": True}, SMALL_HEAD_TWO_GPU_NODES, gpu(2)),
        ({}, CLUSTER_YAML_FIXED, cpu(2, 4)),
        ({"use_gpu": True}, CLUSTER_YAML_FIXED, gpu(1)),
        # The README's own example on cluster.yaml with its autoscaler: wait for 3 more GPU nodes.
        ({"use_gpu": True, "num_workers": 4}, CLUSTER_YAML_AUTOSCALING, gpu(4, waits=True)),
        # A CPU-less head beside an empty group: size on what the autoscaler may add, and wait for it.
        ({}, KUBERAY_EMPTY, TrainPlan(1, 1, 4, False, "SPREAD", waits_for_nodes=True)),
        ({"num_workers": 2}, KUBERAY_EMPTY, TrainPlan(2, 2, 4, False, "SPREAD", waits_for_nodes=True)),
        ({"cpus_per_worker": 2}, KUBERAY_EMPTY, TrainPlan(1, 1, 2, False, "SPREAD", waits_for_nodes=True)),
        ({"use_gpu": True}, KUBERAY_EMPTY, gpu(1, waits=True)),
        ({}, KUBERAY_GPU_GROUP_UP, cpu(1, 4)),  # the CPU-less head is left out
    ],
)
def test_training_plan(settings, nodes, plan):
    assert plan_training(TrainConfig(**settings), nodes) == plan


@pytest.mark.parametrize(
    "settings, nodes, complaint",
    [
        ({"num_workers": 3, "cpus_per_worker": 1}, LAPTOP, "3 worker(s) x 1 CPU do not fit on the cluster (1 node(s): 2 CPU), which holds 2"),
        ({"cpus_per_worker": 4}, LAPTOP, "1 worker(s) x 4 CPU do not fit"),
        ({"cpus_per_worker": 5}, THREE_NODES, "1 worker(s) x 5 CPU do not fit on the cluster (3 node(s): 4 CPU, 4 CPU, 4 CPU), which holds 0"),
        ({"num_workers": 2, "cpus_per_worker": 3}, cluster(Node(4), Node(2)), "which holds 1"),
        ({"use_gpu": True}, LAPTOP, "--use-gpu was given but the Ray cluster has no GPU"),
        ({"use_gpu": True, "num_workers": 2}, ONE_GPU, "needs 2 GPUs; the cluster has 1"),
        ({"min_workers": 2}, LAPTOP, "--min-workers 2 is more than the 1 workers of the run"),
        # cluster.yaml without an autoscaler: nothing can grow, refused at once.
        ({"use_gpu": True, "num_workers": 4}, CLUSTER_YAML_FIXED, "needs 4 GPUs; the cluster has 1"),
        # With one, beyond what it may ever add: refused too.
        ({"use_gpu": True, "num_workers": 9}, CLUSTER_YAML_AUTOSCALING, "needs 9 GPUs; the cluster has 8 at its largest"),
        ({"cpus_per_worker": 8}, CLUSTER_YAML_AUTOSCALING, "do not fit on the largest cluster the autoscaler may run"),
        ({}, NO_CPU, "the Ray cluster has no CPU for the training workers (1 node(s): 0 CPU)"),
        ({"num_workers": 2}, NO_CPU, "the Ray cluster has no CPU for the training workers"),
    ],
)
def test_training_plans_that_cannot_fit_are_refused(settings, nodes, complaint):
    with pytest.raises(ConfigError, match=re.escape(complaint)):
        plan_training(TrainConfig(**settings), nodes)


def test_the_launchers_config_gives_the_groups_an_autoscaler_may_run():
    # As `ray up` leaves cluster.yaml on the head (~/ray_bootstrap_config.yaml), resources filled in.
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["head"]["resources"] = {"CPU": 4}
    config["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 4, "GPU": 1}
    assert launcher_groups(config) == LAUNCHER_GROUPS


def test_inference_plan_after_training_is_sized_to_the_work():
    # A pool sized to the work: one actor per CPU or per batch, whichever is fewer.
    assert plan_inference(TrainConfig(), LAPTOP, 10_000) == InferPlan(2, 1, False)
    assert plan_inference(TrainConfig(), BIG_BOX, 10_000) == InferPlan(10, 1, False)  # 10 batches of 1,024
    assert plan_inference(TrainConfig(), cluster(*[Node(8)] * 125), 10_000).num_actors == 10  # not 1,000 actors
    assert plan_inference(TrainConfig(), BIG_BOX, 300) == InferPlan(1, 1, False)
    assert plan_inference(TrainConfig(num_infer_actors=3), BIG_BOX, 10_000) == InferPlan(3, 1, False)
    assert plan_inference(TrainConfig(use_gpu=True), ONE_GPU, 10_000) == InferPlan(1, 0, True)
    # A node lost during training: the plan follows the cluster as it is now.
    assert plan_inference(TrainConfig(), cluster(Node(cpus=2), Node(cpus=2)), 10_000).num_actors == 4
    assert plan_inference(TrainConfig(), cluster(Node(cpus=2)), 10_000).num_actors == 2
    # No CPU up, but an autoscaler can add one: one actor, placed once it has.
    assert plan_inference(TrainConfig(), KUBERAY_EMPTY, 10_000) == InferPlan(1, 1, False)
    with pytest.raises(ConfigError, match="no CPU for the inference actors"):
        plan_inference(TrainConfig(), NO_CPU, 10_000)


def test_tagging_plan_reads_in_the_actors_on_cpus_and_beside_them_on_gpus():
    tag = TagConfig(checkpoint="c", input="i", output="o")  # batches of 256 photos
    gpu_tag = TagConfig(checkpoint="c", input="i", output="o", use_gpu=True)
    assert plan_tagging(tag, LAPTOP, 20_000) == InferPlan(2, 1, False)  # every CPU decodes, then predicts
    assert plan_tagging(tag, BIG_BOX, 20_000) == InferPlan(16, 1, False)
    assert plan_tagging(tag, BIG_BOX, 500) == InferPlan(2, 1, False)  # two batches: two actors at most
    assert plan_tagging(tag, cluster(Node(cpus=1)), 20_000) == InferPlan(1, 1, False)
    assert plan_tagging(TagConfig(checkpoint="c", input="i", output="o", num_actors=3), BIG_BOX, 20_000) == InferPlan(3, 1, False)
    assert plan_tagging(gpu_tag, ONE_GPU, 20_000) == InferPlan(1, 0, True)
    with pytest.raises(ConfigError, match="no GPU"):
        plan_tagging(gpu_tag, LAPTOP, 20_000)
    assert plan_tagging(tag, KUBERAY_EMPTY, 20_000) == InferPlan(1, 1, False)
    assert plan_tagging(gpu_tag, KUBERAY_EMPTY, 20_000) == InferPlan(1, 0, True)
    with pytest.raises(ConfigError, match="no CPU for the predictor actors"):
        plan_tagging(tag, NO_CPU, 20_000)


# Other work holds part of the cluster (an endpoint's replica, another job): sized to what is free, and said.
HALF_BUSY_LAPTOP = cluster(Node(2, free_cpus=1))
RIG_WITH_AN_ENDPOINT = cluster(Node(2, free_cpus=1), Node(2, free_cpus=2))
FULL_LAPTOP = cluster(Node(2, free_cpus=0))


@pytest.mark.parametrize(
    "settings, nodes, plan",
    [
        ({}, HALF_BUSY_LAPTOP, TrainPlan(1, 1, 1, False, "SPREAD", sized_to_free=True)),
        ({}, RIG_WITH_AN_ENDPOINT, TrainPlan(3, 3, 1, False, "SPREAD", sized_to_free=True)),
        ({"cpus_per_worker": 2}, RIG_WITH_AN_ENDPOINT, TrainPlan(1, 1, 2, False, "SPREAD", sized_to_free=True)),
        ({"num_workers": 2}, RIG_WITH_AN_ENDPOINT, TrainPlan(2, 2, 1, False, "SPREAD", sized_to_free=True)),
    ],
)
def test_a_busy_cluster_plans_on_what_is_free(settings, nodes, plan):
    assert plan_training(TrainConfig(**settings), nodes) == plan


@pytest.mark.parametrize(
    "settings, nodes, complaint",
    [
        ({}, FULL_LAPTOP, "1 worker(s) x 2 CPU cannot be placed now: the cluster has 1 node(s): 2 CPU, free now: "
                          "0 CPU (the rest held by other work); no worker is split across nodes"),
        ({"cpus_per_worker": 2}, HALF_BUSY_LAPTOP, "1 worker(s) x 2 CPU cannot be placed now"),
        ({"num_workers": 4, "cpus_per_worker": 1}, RIG_WITH_AN_ENDPOINT, "free now: 1 CPU, 2 CPU"),
    ],
)
def test_what_fits_the_cluster_but_not_what_is_free_is_one_line_naming_both(settings, nodes, complaint):
    with pytest.raises(ClfError, match=re.escape(complaint)) as refused:
        plan_training(TrainConfig(**settings), nodes)
    assert not isinstance(refused.value, ConfigError)  # not a usage error: the same run fits another time


def test_serving_plans_each_replicas_resources_and_refuses_what_nothing_holds():
    serve = ServeConfig(checkpoint="c")
    assert plan_serving(serve, LAPTOP) == ServePlan(1, 0)
    assert plan_serving(ServeConfig(checkpoint="c", use_gpu=True, cpus_per_replica=2), ONE_GPU) == ServePlan(2, 1)
    # The autoscaler may add a GPU node: the deploy waits for it (and says so).
    assert plan_serving(ServeConfig(checkpoint="c", use_gpu=True), CLUSTER_YAML_AUTOSCALING.__class__(
        (Node(4),), LAUNCHER_GROUPS)) == ServePlan(1, 1, waits_for_nodes=True)
    with pytest.raises(ConfigError, match=re.escape("--use-gpu was given but the Ray cluster has no GPU (and no "
                                                    "autoscaler that can add one)")):
        plan_serving(ServeConfig(checkpoint="c", use_gpu=True), THREE_NODES)
    with pytest.raises(ConfigError, match=re.escape("1 replica(s) of 8 CPU do not fit on the cluster (3 node(s): "
                                                    "4 CPU, 4 CPU, 4 CPU)")):
        plan_serving(ServeConfig(checkpoint="c", cpus_per_replica=8), THREE_NODES)
    with pytest.raises(ConfigError, match=re.escape("3 replica(s) of 1 CPU do not fit")):
        plan_serving(ServeConfig(checkpoint="c", min_replicas=3, max_replicas=3), LAPTOP)


def test_tagging_is_sized_to_the_free_cpus():
    tag = TagConfig(checkpoint="c", input="i", output="o")
    assert plan_tagging(tag, RIG_WITH_AN_ENDPOINT, 20_000) == InferPlan(3, 1, False)
    assert plan_tagging(tag, FULL_LAPTOP, 20_000) == InferPlan(1, 1, False)  # one, placed once a CPU is free


def test_placement_tries_default_to_eleven_and_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.delenv("CLF_PLACEMENT_TRIES", raising=False)
    assert placement_tries() == 11
    monkeypatch.setenv("CLF_PLACEMENT_TRIES", "3")
    assert placement_tries() == 3
    for bad in ("0", "-1", "two", ""):
        monkeypatch.setenv("CLF_PLACEMENT_TRIES", bad)
        with pytest.raises(ConfigError, match=re.escape(f"CLF_PLACEMENT_TRIES={bad}: expected a whole number")):
            placement_tries()
