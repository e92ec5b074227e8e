"""How Ray's failures become ours (one line, or a bug's traceback), the job's run_job, and Ray-the-process facts
that need no cluster; one embedded Ray for what does."""

import pandas as pd
import pytest
import yaml
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError

from clf import cluster as clusters
from clf import failures, noticeboard, pipeline, storage
from clf.config import TrainConfig
from clf.data import TrainingData
from clf.errors import CheckpointError, ClfError, ConfigError, Interrupted, run_job
from clf.plan import Cluster, Node, NodeGroup, launcher_groups, plan_training
from tests.helpers import ROOT


def test_a_clf_error_in_a_worker_stays_one_line_of_its_kind():
    error = WorkerGroupError("rank 0 failed", {0: CheckpointError("checkpoint x has no model.pt")})
    failure = failures.training_failure(error, placed_before=True)
    assert type(failure) is CheckpointError
    assert str(failure) == "training failed on worker 0: checkpoint x has no model.pt"


def test_a_dead_worker_is_a_known_failure():
    error = WorkerGroupError("rank 1 died", {1: ActorDiedError()})
    failure = failures.training_failure(error, placed_before=True)
    assert type(failure) is ClfError and str(failure).startswith("training failed: worker 1 died (")


def test_a_controller_failure_is_a_known_failure():
    failure = failures.training_failure(ControllerError(RuntimeError("placement group could not be created\nmore")),
                                       placed_before=False)
    assert type(failure) is ClfError and str(failure) == "training failed: placement group could not be created"


def test_a_bug_in_a_worker_stays_the_error_it_was():
    error = WorkerGroupError("rank 0 failed", {0: ZeroDivisionError("division by zero")})
    assert failures.training_failure(error, placed_before=True) is error
    other = KeyError("x")
    assert failures.training_failure(other, placed_before=False) is other


def test_run_job_gives_known_failures_one_line_and_lets_bugs_through(capsys):
    def fails(error):
        def job():
            raise error
        return job

    assert run_job("x", fails(ConfigError("bad flag\nsecond line"))) == (2, None)
    assert run_job("x", fails(ClfError("no data"))) == (1, None)
    assert run_job("x", fails(Interrupted("interrupted: run r keeps ..."))) == (130, None)
    assert run_job("x", fails(KeyboardInterrupt())) == (130, None)
    assert capsys.readouterr().err.splitlines() == [
        "x: error: bad flag", "x: error: no data", "x: interrupted: run r keeps ...",
        "x: interrupted; no outputs were written",
    ]
    with pytest.raises(ZeroDivisionError):
        run_job("x", fails(ZeroDivisionError("a bug")))
    assert run_job("x", lambda: 42) == (0, 42)


def test_ray_trains_default_storage_is_the_one_checked():
    from ray.train.constants import DEFAULT_STORAGE_PATH

    assert storage.checkpoint_storage(None) == DEFAULT_STORAGE_PATH


def test_a_run_that_waits_for_the_autoscaler_says_what_it_waits_for(capsys):
    # cluster.yaml with its autoscaler: a CPU head, one GPU node up, up to 8.
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["head"]["resources"] = {"CPU": 4}
    config["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 4, "GPU": 1}
    cluster = Cluster((Node(4), Node(4, 1)), launcher_groups(config))
    cfg = TrainConfig(use_gpu=True, num_workers=4, run_name="r")
    training = TrainingData(classes=["a", "b"], source="tiny", identity="tiny", train=None, num_train=4,
                            eval_rows=pd.DataFrame(), eval_dataset=lambda: None, images_of=lambda ids: None)
    pipeline._announce(cfg, cluster, plan_training(cfg, cluster), training)
    assert ("waiting for the autoscaler to add nodes: 2 node(s): 4 CPU, 4 CPU + 1 GPU are up, too few for "
            "4 worker(s) x 1 CPU + 1 GPU (at least 4); Ray Train tries to place them for about 11 minutes"
            ) in capsys.readouterr().out


@pytest.mark.slow
def test_an_embedded_ray_ignores_a_launcher_file_left_on_the_machine(ray_local, tmp_path, monkeypatch):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 4, "GPU": 1}
    launcher = tmp_path / "ray_bootstrap_config.yaml"
    launcher.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.setattr(clusters, "LAUNCHER_CONFIG", launcher)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert clusters.cluster_nodes().groups is None  # this process's own Ray: nothing will grow it
    with pytest.raises(ConfigError, match="no GPU"):
        plan_training(TrainConfig(use_gpu=True), clusters.cluster_nodes())
    # Joined to a cluster (as a job on a launcher's head node is), the file says what may be added.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert clusters.cluster_nodes().groups == launcher_groups(config)
    assert NodeGroup(4, 1, 8) in clusters.cluster_nodes().groups


@pytest.mark.slow
def test_the_noticeboard_carries_a_document_from_a_worker_to_the_driver(ray_local):
    board = noticeboard.Noticeboard("test-board")

    @ray_local.remote(num_cpus=0)
    def post(key):
        noticeboard.Noticeboard(key).post({"step": [0, 5, 10], "records": [{"epoch": 1}]})

    assert board.read() is None
    ray_local.get(post.remote("test-board"))
    assert board.read() == {"step": [0, 5, 10], "records": [{"epoch": 1}]}
    board.remove()
    assert board.read() is None
