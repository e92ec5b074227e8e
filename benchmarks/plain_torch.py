"""The baseline: the same model, batch size, epochs, optimizer, schedule and epoch loop as `jobs/train.py`
(clf.train's own functions, not a copy), in one plain PyTorch process (no Ray), then prediction over the
test set. Prints one JSON line of figures.

    python benchmarks/plain_torch.py [--epochs 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from clf import data, metrics  # noqa: E402
from clf.config import TrainConfig  # noqa: E402
from clf.train import array_batches, make_learner, new_model, train_epochs  # noqa: E402


def main() -> None:
    defaults = TrainConfig()
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    args = p.parse_args()
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed)

    dataset = data.load()
    images, labels = dataset.train.images, dataset.train.labels
    # Training starts with the model and its optimizer, as in the Ray worker (building the first optimizer
    # of a process imports torch._dynamo: about a second).
    train_started = time.perf_counter()
    learner = make_learner(cfg, new_model(cfg, len(data.CLASSES)), len(labels))
    # Rank 0 of 1: the Ray path's batches, in its order.
    history = train_epochs(learner, lambda epoch: array_batches(images, labels, epoch, cfg, 0, 1), cfg)
    train_s = time.perf_counter() - train_started

    infer_started = time.perf_counter()
    model = learner.model.eval()
    with torch.inference_mode():
        test = torch.from_numpy(dataset.test.images)
        predictions = torch.cat(
            [model(data.preprocess(test[i : i + cfg.infer_batch_size])).argmax(1) for i in range(0, len(test), cfg.infer_batch_size)]
        )
    infer_s = time.perf_counter() - infer_started
    scores = metrics.compute(dataset.test.labels, predictions.numpy(), len(data.CLASSES))
    print(json.dumps({
        "train_s": train_s,
        "infer_s": infer_s,
        "in_process_s": time.perf_counter() - STARTED,
        "accuracy": scores.accuracy,
        "history": history,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
