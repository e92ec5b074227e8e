"""Tagging throughput on in-memory images: Ray Data's predictor over an actor pool (ONNX Runtime, one thread per
actor, an actor per CPU) against a plain torch loop and a plain ONNX Runtime loop in one process (every core),
same images, same model. Prints one JSON line.

    python benchmarks/tagging.py [--images 100000]

- `ray_*`: from the call to the last row, actor start-up included (it is part of every tagging run), and apart,
  the seconds until the first batch came back and the rate after it;
- `plain_torch_images_per_s`, `plain_onnx_images_per_s`: the model over the same batches in this process, after
  it is loaded (torch: the checkpoint's model with preprocessing and softmax, `clf.checkpoint.inference_model`;
  ONNX Runtime: the checkpoint's model.onnx, the same graph).
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

from clf import checkpoint, data  # noqa: E402
from clf.config import TrainConfig  # noqa: E402


def plain_torch(files: checkpoint.ModelFiles, images: np.ndarray, batch_size: int) -> float:
    import torch

    torch.set_num_threads(os.cpu_count())  # every core, as Ray Data gets
    model = checkpoint.inference_model(checkpoint.build(files)[0])
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            model(torch.from_numpy(images[i : i + batch_size])).max(dim=1)
    return len(images) / (time.perf_counter() - started)


def plain_onnx(files: checkpoint.ModelFiles, images: np.ndarray, batch_size: int) -> float:
    from clf.predictor import OnnxEngine

    engine = OnnxEngine(files, threads=os.cpu_count())
    started = time.perf_counter()
    for i in range(0, len(images), batch_size):
        engine(images[i : i + batch_size]).max(axis=1)
    return len(images) / (time.perf_counter() - started)


def with_ray(files: checkpoint.ModelFiles, split: data.Split, cfg: TrainConfig) -> dict:
    """Images/s from the call to the last row (actor start-up included: it is part of every tagging run),
    and, apart, the seconds until the first batch came back and the rate after it."""
    from clf import cluster, plan, session
    from clf.infer import predict

    session.connect()
    pool = plan.plan_inference(cfg, cluster.cluster_nodes(), len(split.labels))  # the actors the job would use
    started = time.perf_counter()
    tagged = predict(data.to_ray_dataset(split), files, pool, cfg.infer_batch_size)
    count, first = 0, None
    for batch in tagged.iter_batches(batch_size=None):
        count += len(batch["prediction"])
        if first is None:
            first, first_count = time.perf_counter(), count
    ended = time.perf_counter()
    assert count == len(split.labels), count
    return {"ray_images_per_s": count / (ended - started), "ray_first_batch_s": first - started,
            "ray_after_first_images_per_s": (count - first_count) / (ended - first), "ray_actors": pool.num_actors}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=100_000)
    args = p.parse_args()
    cfg = TrainConfig()
    test = data.load().test
    repeat = -(-args.images // len(test.labels))
    split = data.Split(images=np.tile(test.images, (repeat, 1, 1))[:args.images],
                       labels=np.tile(test.labels, repeat)[:args.images])
    with tempfile.TemporaryDirectory() as folder:
        import torch

        from clf.model import FashionCNN

        torch.manual_seed(0)
        checkpoint.save(folder, FashionCNN(), data.CLASSES)  # throughput does not depend on the weights
        files = checkpoint.read(folder)
    rates = {"plain_torch_images_per_s": plain_torch(files, split.images, cfg.infer_batch_size),
             "plain_onnx_images_per_s": plain_onnx(files, split.images, cfg.infer_batch_size)}
    print(json.dumps({"images": len(split.labels)} | rates | with_ray(files, split, cfg)))


if __name__ == "__main__":
    main()
