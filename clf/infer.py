"""One predictor, used by test-set evaluation and by catalog tagging alike.

`Predictor` is a callable class for Ray Data's `map_batches`: each actor of the pool loads the checkpoint
once and then maps batches of rows. Every column but `image` passes through untouched, so the row's id
and label travel with its prediction whatever order Ray Data delivers the rows in.
"""

from __future__ import annotations

import numpy as np
import torch

from clf.checkpoint import load_model
from clf.data import preprocess


class Predictor:
    def __init__(self, checkpoint, use_gpu: bool = False, num_threads: int | None = None):
        """`checkpoint`: a `ray.train.Checkpoint` (fetched from Ray's storage, which on a multi-node
        cluster is shared) or a local folder path."""
        if num_threads:
            # Ray sets OMP_NUM_THREADS=1 in its workers; use the CPUs this actor was given.
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if isinstance(checkpoint, str):
            self.model, self.classes = load_model(checkpoint, self.device)
        else:
            with checkpoint.as_directory() as folder:
                self.model, self.classes = load_model(folder, self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.array(batch.pop("image"), dtype=np.uint8)).to(self.device)
        probs = torch.softmax(self.model(preprocess(images)), dim=1)
        confidence, prediction = probs.max(dim=1)
        batch["prediction"] = prediction.cpu().numpy().astype(np.int64)
        batch["confidence"] = confidence.cpu().numpy().astype(np.float32)
        return batch


def predict(dataset, checkpoint, *, batch_size: int, num_actors: int, use_gpu: bool, cpus_per_actor: int):
    """The dataset's rows with `image` replaced by `prediction` (class index) and `confidence`."""
    import ray.data

    return dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "use_gpu": use_gpu,
            "num_threads": cpus_per_actor,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
