"""The baseline: the same model, batch size, epochs, optimizer and schedule as `jobs/train.py`, in one plain
PyTorch process (no Ray), then prediction over the test set. Prints one JSON line of figures.

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
from torch import nn  # noqa: E402

from clf import data, metrics  # noqa: E402
from clf.config import TrainConfig  # noqa: E402
from clf.model import FashionCNN  # noqa: E402
from clf.train import epoch_batches, steps_per_epoch  # noqa: E402


def main() -> None:
    defaults = TrainConfig()
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    args = p.parse_args()
    cfg = defaults.replace(epochs=args.epochs, seed=args.seed)

    dataset = data.load()
    images, labels = dataset.train.images, dataset.train.labels
    torch.manual_seed(cfg.seed)
    model = FashionCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps_per_epoch(len(labels), cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.25
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    train_started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        # The Ray path's batches, in the same order.
        for index in epoch_batches(len(labels), epoch, cfg.seed, rank=0, world_size=1, batch_size=cfg.batch_size):
            x = data.preprocess(torch.from_numpy(images[index]))
            y = torch.from_numpy(labels[index])
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    train_s = time.perf_counter() - train_started

    infer_started = time.perf_counter()
    model.eval()
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
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
