"""Accuracy against training time for candidate settings of the model and its training, in the plain loop
(`clf.loop`, as `benchmarks/plain_torch.py` runs it): each candidate trained for each seed, its test accuracy
and training seconds (model, optimizer and every epoch), the medians printed per candidate, and its time as a
ratio of the first candidate's (the shipped defaults, as a rule). Candidates run one after the other in one
invocation, so their times compare; the CPU model is printed beside them.

    .venv/bin/python benchmarks/models.py '{"defaults": {}, "wider": {"width": 1.25}, "no decay": {"weight_decay": 0}}'

Each candidate is a JSON object of settings of jobs/train.py (lr, batch_size, weight_decay, label_smoothing,
width, epochs) and of `FashionCNN` (channels, hidden, dropout: a shape of its own, in place of --width).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from clf.loop import new_model  # noqa: E402

SHAPE = {"channels", "hidden", "dropout"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", type=json.loads, help='JSON: {"name": {settings}, ...}')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    dataset = data.load()
    print(f"machine: {cpu_model()}; seeds {args.seeds}; accuracy on the {len(dataset.test.labels):,} test images")
    first = None
    for name, settings in args.candidates.items():
        shape = {k: v for k, v in settings.items() if k in SHAPE}
        accuracies, seconds = [], []
        for seed in args.seeds:
            cfg = dataclasses.replace(TrainConfig(seed=seed), **{k: v for k, v in settings.items() if k not in SHAPE})
            started = time.perf_counter()
            if shape:
                torch.manual_seed(seed)  # as clf.loop.new_model does
                model = FashionCNN(num_classes=len(data.CLASSES), **shape)
            else:
                model = new_model(cfg, len(data.CLASSES))
            learner, _ = train(cfg, model, dataset.train)
            seconds.append(time.perf_counter() - started)
            predictions = predict(learner.model, dataset.test.images, cfg.infer_batch_size)
            accuracies.append(metrics.compute(dataset.test.labels, predictions, len(data.CLASSES)).accuracy)
        median_s = statistics.median(seconds)
        first = first or median_s
        print(f"{name:24} accuracy {statistics.median(accuracies):.4f} ({', '.join(f'{a:.4f}' for a in accuracies)})  "
              f"training {median_s:.1f} s ({median_s / first:.2f}x)  {json.dumps(settings)}", flush=True)


if __name__ == "__main__":
    main()
