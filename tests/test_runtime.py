"""The plan on made-up clusters (no Ray started), and how failures become one line or stay bugs."""

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError

from clf import runtime
from clf.config import TagConfig, TrainConfig
from clf.errors import CheckpointError, ClfError, ConfigError, run_job
from clf.runtime import InferPlan, Node, TrainPlan, plan_inference, plan_tagging, plan_training

LAPTOP = [Node(cpus=2)]
BIG_BOX = [Node(cpus=16)]
ONE_GPU = [Node(cpus=8, gpus=1)]


@pytest.mark.parametrize(
    "settings, nodes, plan",
    [
        ({}, LAPTOP, TrainPlan(1, 1, 2, False)),  # one worker using every core
        ({}, BIG_BOX, TrainPlan(1, 1, 16, False)),
        ({"num_workers": 2}, LAPTOP, TrainPlan(2, 2, 1, False)),
        ({"num_workers": 4, "cpus_per_worker": 2}, BIG_BOX, TrainPlan(4, 4, 2, False)),
        ({"use_gpu": True}, ONE_GPU, TrainPlan(1, 1, 1, True)),  # one per GPU, a CPU to feed it
        ({"num_workers": 2, "min_workers": 1}, LAPTOP, TrainPlan(2, 1, 1, False)),  # elastic
        # Elastic with more than fits now: it starts with what fits, down to its minimum.
        ({"num_workers": 4, "min_workers": 2, "cpus_per_worker": 1}, LAPTOP, TrainPlan(4, 2, 1, False)),
        ({"num_workers": 3, "min_workers": 1, "use_gpu": True}, ONE_GPU, TrainPlan(3, 1, 1, True)),
    ],
)
def test_training_plan(settings, nodes, plan):
    assert plan_training(TrainConfig(**settings), nodes) == plan


@pytest.mark.parametrize(
    "settings, nodes, complaint",
    [
        ({"num_workers": 3, "cpus_per_worker": 1}, LAPTOP, "3 workers x 1 CPUs need 3 CPUs; the cluster has 2"),
        ({"cpus_per_worker": 4}, LAPTOP, "1 workers x 4 CPUs need 4 CPUs"),
        ({"use_gpu": True}, LAPTOP, "--use-gpu was given but the Ray cluster has no GPU"),
        ({"use_gpu": True, "num_workers": 2}, ONE_GPU, "needs 2 GPUs; the cluster has 1"),
        ({"min_workers": 2}, LAPTOP, "--min-workers 2 is more than the 1 workers of the run"),
    ],
)
def test_training_plans_that_cannot_fit_are_refused(settings, nodes, complaint):
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(")):
        plan_training(TrainConfig(**settings), nodes)


def test_inference_plan_after_training():
    assert plan_inference(TrainConfig(), LAPTOP) == InferPlan(2, 1, False)  # one single-threaded actor per CPU
    assert plan_inference(TrainConfig(), BIG_BOX) == InferPlan(16, 1, False)
    assert plan_inference(TrainConfig(num_infer_actors=3), BIG_BOX) == InferPlan(3, 1, False)
    assert plan_inference(TrainConfig(use_gpu=True), ONE_GPU) == InferPlan(1, 0, True)
    # A node lost during training: the plan follows the cluster as it is now.
    assert plan_inference(TrainConfig(), [Node(cpus=2), Node(cpus=2)]).num_actors == 4
    assert plan_inference(TrainConfig(), [Node(cpus=2)]).num_actors == 2


def test_tagging_plan_leaves_the_decoders_a_cpu():
    tag = TagConfig(checkpoint="c", input="i", output="o")
    assert plan_tagging(tag, LAPTOP) == InferPlan(1, 1, False)
    assert plan_tagging(tag, BIG_BOX) == InferPlan(15, 1, False)
    assert plan_tagging(tag, [Node(cpus=1)]) == InferPlan(1, 0.5, False)  # shares its one CPU
    assert plan_tagging(TagConfig(checkpoint="c", input="i", output="o", use_gpu=True), ONE_GPU) == InferPlan(1, 0, True)
    with pytest.raises(ConfigError, match="no GPU"):
        plan_tagging(TagConfig(checkpoint="c", input="i", output="o", use_gpu=True), LAPTOP)


def test_a_clf_error_in_a_worker_stays_one_line_of_its_kind():
    error = WorkerGroupError("rank 0 failed", {0: CheckpointError("checkpoint x has no model.pt")})
    failure = runtime.training_failure(error)
    assert type(failure) is CheckpointError
    assert str(failure) == "training failed on worker 0: checkpoint x has no model.pt"


def test_a_dead_worker_is_a_known_failure():
    error = WorkerGroupError("rank 1 died", {1: ActorDiedError()})
    failure = runtime.training_failure(error)
    assert type(failure) is ClfError and str(failure).startswith("training failed: worker 1 died (")


def test_a_controller_failure_is_a_known_failure():
    failure = runtime.training_failure(ControllerError(RuntimeError("placement group could not be created\nmore")))
    assert type(failure) is ClfError and str(failure) == "training failed: placement group could not be created"


def test_a_bug_in_a_worker_stays_the_error_it_was():
    error = WorkerGroupError("rank 0 failed", {0: ZeroDivisionError("division by zero")})
    assert runtime.training_failure(error) is error
    other = KeyError("x")
    assert runtime.training_failure(other) is other


def test_run_job_gives_known_failures_one_line_and_lets_bugs_through(capsys):
    def fails(error):
        def job():
            raise error
        return job

    assert run_job("x", fails(ConfigError("bad flag\nsecond line"))) == (2, None)
    assert run_job("x", fails(ClfError("no data"))) == (1, None)
    assert capsys.readouterr().err.splitlines() == ["x: error: bad flag", "x: error: no data"]
    with pytest.raises(ZeroDivisionError):
        run_job("x", fails(ZeroDivisionError("a bug")))
    assert run_job("x", lambda: 42) == (0, 42)
