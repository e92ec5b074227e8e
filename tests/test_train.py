import signal
import time

import numpy as np
import pytest

from clf import checkpoint, data
from clf.config import TrainConfig
from clf.train import epoch_batches, fit, shard_order
from conftest import real_subset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_train(real_data):
    """4,000 real training images: enough for the loss to fall within two short epochs."""
    return real_subset(real_data, 4000, seed=0)


def train(split, tmp_path, name, **overrides):
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 64, "storage_path": str(tmp_path), **overrides})
    return fit(cfg.replace(run_name=name), split)


def losses(result):
    return result.metrics_dataframe.sort_values("epoch")["loss"].tolist()


def test_shards_cover_the_data_once_and_agree_across_ranks():
    shards = [shard_order(1003, epoch=1, seed=5, rank=r, world_size=3) for r in range(3)]
    assert {len(s) for s in shards} == {334}  # equal counts; 1 image left out this epoch
    together = np.concatenate(shards)
    assert len(np.unique(together)) == len(together)
    assert not np.array_equal(shards[0], shard_order(1003, epoch=2, seed=5, rank=0, world_size=3))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_step_count_depends_on_the_global_batch_only(world_size):
    # An elastic run that loses a worker keeps its schedule: as many steps per epoch with any world size.
    batches = [epoch_batches(1003, 0, 5, rank, world_size, batch_size=64) for rank in range(world_size)]
    assert {len(b) for b in batches} == {16}  # ceil(1003 / 64)
    sizes = {len(batch) for rank_batches in batches for batch in rank_batches}
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= -(-64 // world_size)
    together = np.concatenate([batch for rank_batches in batches for batch in rank_batches])
    assert len(np.unique(together)) == len(together) == 1003 // world_size * world_size


@pytest.mark.parametrize("workers", [1, 2])
def test_training_lowers_the_loss(ray_local, small_train, tmp_path, workers):
    result = train(small_train, tmp_path, f"w{workers}", num_workers=workers, cpus_per_worker=1)
    first, second = losses(result)
    assert second < first
    assert result.metrics["accuracy"] > 0.6  # global over all ranks' shards, not one worker's
    model, classes = checkpoint.load_model(result.checkpoint.path)
    assert classes == list(data.CLASSES)


def test_same_seed_and_workers_give_the_same_metrics(ray_local, small_train, tmp_path):
    a = train(small_train, tmp_path, "a", num_workers=2, cpus_per_worker=1, seed=3)
    b = train(small_train, tmp_path, "b", num_workers=2, cpus_per_worker=1, seed=3)
    c = train(small_train, tmp_path, "c", num_workers=2, cpus_per_worker=1, seed=4)
    assert losses(a) == losses(b)
    assert a.metrics["accuracy"] == b.metrics["accuracy"]
    assert losses(a) != losses(c)


def test_a_finished_fit_leaves_no_controller_behind_and_ctrl_c_as_it_was(ray_local, small_train, tmp_path):
    # Ray Train's Ctrl-C handler held the finished controller actor (about 0.4 GiB) through inference.
    from ray.util.state import list_actors

    before = signal.getsignal(signal.SIGINT)
    train(small_train, tmp_path, "ctrl-c", epochs=1, num_workers=1, cpus_per_worker=1)
    assert signal.getsignal(signal.SIGINT) is before

    def alive_controllers():
        return list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])

    deadline = time.monotonic() + 30
    while alive_controllers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive_controllers()
