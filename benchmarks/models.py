"""Accuracy against training time for other shapes of `FashionCNN`, in the plain loop (`clf.train`, as
`benchmarks/plain_torch.py` runs it): each shape trained for each seed, test accuracy and training seconds
(model, optimizer and every epoch), the medians printed per shape. Shapes run one after the other in one
invocation, so their times compare; print the CPU model beside them.

    .venv/bin/python benchmarks/models.py '{"shipped": {}, "wider": {"channels": [24, 48, 96]}}' [--seeds 0 1 2]

Each shape is a JSON object of `FashionCNN` arguments (channels, hidden, dropout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.overhead import cpu_model  # noqa: E402
from benchmarks.plain_torch import predict, train  # noqa: E402
from clf import data, metrics  # noqa: E402
from clf.config import TrainConfig  # noqa: E402
from clf.model import FashionCNN  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shapes", type=json.loads, help='JSON: {"name": {FashionCNN arguments}, ...}')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    dataset = data.load()
    print(f"machine: {cpu_model()}; {args.epochs} epoch(s), seeds {args.seeds}")
    for name, shape in args.shapes.items():
        accuracies, seconds = [], []
        for seed in args.seeds:
            cfg = TrainConfig(epochs=args.epochs, seed=seed)
            started = time.perf_counter()
            torch.manual_seed(seed)  # as clf.train.new_model does
            learner, _ = train(cfg, FashionCNN(num_classes=len(data.CLASSES), **shape), dataset.train)
            seconds.append(time.perf_counter() - started)
            predictions = predict(learner.model, dataset.test.images, cfg.infer_batch_size)
            accuracies.append(metrics.compute(dataset.test.labels, predictions, len(data.CLASSES)).accuracy)
        print(f"{name:12} accuracy {statistics.median(accuracies):.4f} ({', '.join(f'{a:.4f}' for a in accuracies)})  "
              f"training {statistics.median(seconds):.1f} s", flush=True)


if __name__ == "__main__":
    main()
