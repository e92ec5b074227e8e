"""The training step and loop (plain PyTorch, no Ray), then fit() on one embedded Ray: one and two workers, the
dealing of the rows, determinism, and failures in a worker as the driver sees them."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from clf import checkpoint, data
from clf.config import TrainConfig
from clf.errors import CheckpointError
from clf.plan import TrainPlan
from clf.loop import array_batches, epoch_batches, make_learner, new_model, steps_per_epoch, train_epochs
from clf.trainer import fit
from tests.helpers import ROOT, real_subset, training_data


def test_an_epoch_takes_each_image_of_the_shard_once_in_a_seeded_order():
    batches = epoch_batches(1003, epoch=1, seed=5, steps=16)
    together = np.concatenate(batches)
    assert sorted(together) == list(range(1003))
    assert not np.array_equal(together, np.concatenate(epoch_batches(1003, epoch=2, seed=5, steps=16)))
    assert np.array_equal(together, np.concatenate(epoch_batches(1003, epoch=1, seed=5, steps=16)))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_step_count_depends_on_the_global_batch_only(world_size):
    # An elastic run that loses a worker keeps its schedule: as many steps per epoch with any world size,
    # each rank's part (1003 / world_size images) cut into them.
    steps = steps_per_epoch(1003, 64)
    assert steps == 16
    batches = epoch_batches(1003 // world_size, 0, 5, steps)
    sizes = {len(batch) for batch in batches}
    assert len(batches) == 16 and max(sizes) - min(sizes) <= 1 and max(sizes) <= -(-64 // world_size)


def test_the_plain_loop_lowers_the_loss(real_data):
    split = real_subset(real_data, 2000, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=64)
    learner = make_learner(cfg, new_model(cfg, 10), len(split.labels))
    history = train_epochs(learner, lambda epoch: array_batches(split.images, split.labels, epoch, cfg, 2000), cfg)
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["loss"] < history[0]["loss"]
    assert history[1]["accuracy"] > 0.7


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_spares_the_page_faults_of_refilling_it():
    # Each side in a process of its own: malloc's settings cannot be undone. Blocks of a fixed size freed every
    # step (a torch step's faults depend on the order its first tensors are freed in, so they cannot be a test).
    def faults(malloc: str) -> int:
        out = subprocess.run([sys.executable, "-m", "tests.programs", "step-page-faults", malloc], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip().splitlines()[-1])

    adaptive = faults("adaptive")
    assert faults("kept") * 10 < adaptive
    # The training loop keeps it so: after a short train_epochs, the same steps fault as seldom.
    assert faults("after-the-loop") * 10 < adaptive


# --- fit() on a real (embedded) Ray --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_train(real_data):
    """2,500 real training images: enough for the loss to fall within two short epochs."""
    return training_data(real_subset(real_data, 2500, seed=0))


def run_fit(training, tmp_path, name, workers=1, **overrides):
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 64, "storage_path": str(tmp_path), "run_name": name, **overrides})
    return fit(cfg, TrainPlan(num_workers=workers, min_workers=workers, cpus_per_worker=1, use_gpu=False), training)


def losses(fitted):
    return [record["loss"] for record in fitted.history]


@pytest.mark.slow
def test_two_workers_train_the_model_one_worker_trains_and_keep_their_weights_equal(ray_local, small_train, tmp_path):
    one = run_fit(small_train, tmp_path, "one", workers=1, seed=3, epochs=3)
    two = run_fit(small_train, tmp_path, "two", workers=2, seed=3, epochs=3)
    again = run_fit(small_train, tmp_path, "again", workers=2, seed=3, epochs=3)

    for fitted, workers in ((one, 1), (two, 2)):
        first, *_, last = losses(fitted)
        assert last < first and fitted.history[-1]["accuracy"] > 0.75  # over every rank's part, not rank 0's
        assert [r["epoch"] for r in fitted.history] == [1, 2, 3]  # every epoch, though Ray keeps 2 checkpoints
        record = fitted.history[-1]
        assert record["workers"] == workers and len(record["nodes"]) == workers
        assert sum(record["rows"]) == 2500 and max(record["rows"]) - min(record["rows"]) <= 1  # every row, dealt
        assert len(set(record["weights"])) == 1  # DDP: the ranks end every epoch with the same weights
    assert len([p for p in (tmp_path / "one").glob("checkpoint_*") if p.is_dir()]) == 2
    # Two workers on the same data learn what one learns: the same loss curve within a little (their batches
    # are the same images, split in halves; BatchNorm's statistics and dropout are per rank).
    assert np.allclose(losses(two), losses(one), atol=0.05), (losses(one), losses(two))
    # The same seed and worker count: the same parts, the same batches, the same numbers.
    assert losses(two) == losses(again) and two.history[-1]["weights"] == again.history[-1]["weights"]
    model, classes = checkpoint.load_model(two.checkpoint.path)
    assert classes == list(data.CLASSES)

    # The worker's side of the start-up, on the record (seconds from fit() called) and in order.
    line = two.timeline
    moments = [line[k] for k in ("process", "train_fn", "shard_in_memory", "first_step", "last_step",
                                 "last_report_returned", "fit_returned")]
    assert moments == sorted(moments) and moments[0] >= 0, line
    assert abs(line["fit_called_at"] + line["process"] - two.history[-1]["started"]["process"]) < 1e-3


@pytest.mark.slow
def test_rows_fetched_by_each_rank_are_its_own_part_in_id_order(ray_local):
    # Blocks that hold the rows in a shuffled order (as a catalog's read pass leaves them); each image carries its
    # id in two pixels, each label is its id's last digit.
    count, ids = 1000, np.random.default_rng(1).permutation(1000)
    images = np.zeros((count, 28, 28), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(count) // 256, np.arange(count) % 256
    rows = data.Blocks.put(data.tables(data.Split(images, np.arange(count) % 10), rows_per_block=128, ids=ids))

    @ray.remote(num_cpus=0)
    def take(rank, world_size):
        return rows.take(rank, world_size)

    for world_size in (1, 2, 3):
        seen = []
        for rank, (part_images, part_labels) in enumerate(ray.get([take.remote(r, world_size) for r in range(world_size)])):
            part_ids = part_images[:, 0, 0].astype(int) * 256 + part_images[:, 0, 1]
            # Its own rows (its run of the blocks' order), in id order, each label with its image.
            assert part_ids.tolist() == sorted(ids[rank * count // world_size:(rank + 1) * count // world_size])
            np.testing.assert_array_equal(part_labels, part_ids % 10)
            seen += part_ids.tolist()
        assert sorted(seen) == list(range(count))  # every row, once


@pytest.mark.slow
def test_a_finished_fit_leaves_no_controller_behind_and_ctrl_c_as_it_was(ray_local, real_data, tmp_path):
    # Ray Train's Ctrl-C handler held the finished controller actor (hundreds of MB) through inference.
    from ray._private.state import actors

    before = signal.getsignal(signal.SIGINT)
    run_fit(training_data(real_subset(real_data, 500, seed=2)), tmp_path, "ctrl-c", epochs=1)
    assert signal.getsignal(signal.SIGINT) is before

    def alive_controllers():
        return [a for a in actors().values() if a["ActorClassName"].endswith("TrainController") and a["State"] == "ALIVE"]

    deadline = time.monotonic() + 30
    while alive_controllers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive_controllers()


@pytest.mark.slow
def test_a_clf_error_raised_in_a_worker_reaches_the_driver_as_one_line(ray_local, real_data, tmp_path):
    # A real one: the run's checkpoint in the storage is damaged, and the worker that resumes from it fails.
    training = training_data(real_subset(real_data, 500, seed=3))
    first = run_fit(training, tmp_path, "damaged", epochs=1)
    (Path(first.checkpoint.path) / checkpoint.WEIGHTS).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"^training failed on worker 0: .*/damaged/checkpoint_.*/model\.pt"):
        run_fit(training, tmp_path, "damaged", epochs=2, max_failures=0)


@pytest.mark.slow
def test_a_bug_in_a_worker_reaches_the_driver_with_its_type_and_traceback(ray_local, real_data, tmp_path):
    # Rows that are not Arrow tables: the worker's own code fails on them, as a bug of ours would.
    from dataclasses import replace

    from ray.train import WorkerGroupError

    training = training_data(real_subset(real_data, 100, seed=4))
    broken = replace(training, train=data.Blocks((ray.put({"not": "a table"}),), (100,)))
    with pytest.raises(WorkerGroupError) as caught:
        run_fit(broken, tmp_path, "bug", epochs=1, max_failures=0)
    failure = caught.value.worker_failures[0]
    assert not isinstance(failure, CheckpointError)  # not one of ours: shown as it is, never as one line
    assert "in take" in str(caught.value)  # with the worker's traceback, down to where it failed


@pytest.mark.slow
def test_fewer_held_out_rows_than_workers_validate_without_hanging(ray_local, real_data, tmp_path):
    # A catalog with fewer validation photos than workers: one rank holds none. A DDP-wrapped forward would have
    # the other rank wait for it in a buffer broadcast for ever.
    import threading
    from dataclasses import replace

    training = training_data(real_subset(real_data, 400, seed=5))
    held = real_subset(real_data, 1, seed=6)
    training = replace(training, validation=data.Blocks.put(data.tables(held)))
    outcome = {}
    fitting = threading.Thread(target=lambda: outcome.update(fitted=run_fit(training, tmp_path, "one-held", workers=2,
                                                                            epochs=1, validation=True)), daemon=True)
    fitting.start()
    fitting.join(timeout=150)
    assert not fitting.is_alive(), "training with an empty validation part on one rank hung"
    record = outcome["fitted"].history[-1]
    assert record["workers"] == 2 and 0 <= record["val_accuracy"] <= 1 and record["val_loss"] > 0
