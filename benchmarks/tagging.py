"""Tagging throughput: Ray Data's predictor over an actor pool against a plain torch loop, same images,
same model, same CPUs. Prints one JSON line.

    python benchmarks/tagging.py [--images 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from clf import checkpoint, data  # noqa: E402
from clf.config import TrainConfig  # noqa: E402
from clf.model import FashionCNN  # noqa: E402


def plain(checkpoint_dir: str, images: np.ndarray, batch_size: int) -> float:
    torch.set_num_threads(os.cpu_count())  # every core, as Ray Data gets
    model, _ = checkpoint.load_model(checkpoint_dir)
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            probs = torch.softmax(model(data.preprocess(torch.from_numpy(images[i : i + batch_size]))), dim=1)
            probs.max(dim=1)
    return len(images) / (time.perf_counter() - started)


def with_ray(checkpoint_dir: str, split: data.Split, cfg: TrainConfig) -> dict:
    """Images/s from the call to the last row (actor start-up included: it is part of every tagging run),
    and, apart, the seconds until the first batch came back and the rate after it."""
    from clf import plan, runtime
    from clf.infer import predict

    runtime.connect()
    pool = plan.plan_inference(cfg, runtime.cluster_nodes(), len(split.labels))  # the actors the job would use
    started = time.perf_counter()
    tagged = predict(data.to_ray_dataset(split), checkpoint.read(checkpoint_dir), pool, cfg.infer_batch_size)
    count, first = 0, None
    for batch in tagged.iter_batches(batch_size=None):
        count += len(batch["prediction"])
        if first is None:
            first, first_count = time.perf_counter(), count
    ended = time.perf_counter()
    assert count == len(split.labels), count
    return {"ray_images_per_s": count / (ended - started), "ray_first_batch_s": first - started,
            "ray_after_first_images_per_s": (count - first_count) / (ended - first)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=100_000)
    args = p.parse_args()
    cfg = TrainConfig()
    test = data.load().test
    repeat = -(-args.images // len(test.labels))
    split = data.Split(images=np.tile(test.images, (repeat, 1, 1)), labels=np.tile(test.labels, repeat))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        checkpoint.save(folder, FashionCNN(), data.CLASSES)  # throughput does not depend on the weights
        plain_rate = plain(folder, split.images, cfg.infer_batch_size)
        ray = with_ray(folder, split, cfg)
    print(json.dumps({"images": len(split.labels), "plain_images_per_s": plain_rate} | ray))


if __name__ == "__main__":
    main()
