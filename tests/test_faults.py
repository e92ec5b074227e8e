"""Real faults: a training worker process killed with SIGKILL mid-run."""


import pytest

from clf import checkpoint
from clf.config import TrainConfig
from clf.errors import ClfError
from clf.plan import TrainPlan
from clf.trainer import fit
from tests.faults import worker_killed_after_first_checkpoint
from tests.helpers import real_subset, training_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subset(real_data):
    return training_data(real_subset(real_data, 4000, seed=1))


ONE_WORKER = TrainPlan(num_workers=1, min_workers=1, cpus_per_worker=2, use_gpu=False)


def four_epochs(tmp_path, name: str, max_failures: int) -> TrainConfig:
    return TrainConfig(epochs=4, batch_size=64, storage_path=str(tmp_path), run_name=name, max_failures=max_failures)


def test_killed_worker_resumes_from_the_checkpoint_and_ends_as_if_never_killed(ray_local, subset, tmp_path):
    with worker_killed_after_first_checkpoint(tmp_path / "faulty") as killed:
        result = fit(four_epochs(tmp_path, "faulty", max_failures=2), ONE_WORKER, subset)

    assert killed, "no training worker was found to kill"
    last = result.history[-1]
    assert last["epoch"] == 4
    assert last["resumed_from_epoch"] >= 1  # the second attempt started from a checkpoint
    assert [record["epoch"] for record in result.history] == [1, 2, 3, 4]  # the epochs before the kill too
    checkpoint.load_model(result.checkpoint.path)

    # Same seed, same workers, never killed: the same numbers, so the resumed run lost and repeated nothing.
    clean = fit(four_epochs(tmp_path, "clean", max_failures=2), ONE_WORKER, subset)
    assert clean.history[-1]["resumed_from_epoch"] == 0
    assert last["loss"] == clean.history[-1]["loss"]
    assert last["accuracy"] == clean.history[-1]["accuracy"]


def test_without_retries_a_killed_worker_fails_the_run(ray_local, subset, tmp_path):
    with worker_killed_after_first_checkpoint(tmp_path / "fragile") as killed:
        with pytest.raises(ClfError, match="training failed: worker 0 died"):
            fit(four_epochs(tmp_path, "fragile", max_failures=0), ONE_WORKER, subset)
    assert killed
