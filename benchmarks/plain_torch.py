"""The baseline: the same model, batch size, epochs, optimizer, schedule and epoch loop as `jobs/train.py`
(clf.loop's own functions, not a copy), in one plain PyTorch process (no Ray), then prediction over the
test set. Prints one JSON line of figures, with the moments of the process (unix seconds) for a side by side
with the Ray run's phases.

    python benchmarks/plain_torch.py [--epochs 2] [--seed 0] [--device cuda] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from clf import data, metrics  # noqa: E402
from clf.config import TrainConfig  # noqa: E402
from clf.loop import Learner, array_batches, make_learner, new_model, train_epochs  # noqa: E402


def train(cfg: TrainConfig, model: torch.nn.Module, split: data.Split,
          moments: dict | None = None, device: torch.device = torch.device("cpu")) -> tuple[Learner, list[dict]]:
    """The worker's loop as rank 0 of 1 (the Ray path's batches, in its order): the learner and the history.
    `moments`, if given, gets the unix times of the first and the last optimizer step."""
    learner = make_learner(cfg, model.to(device), len(split.labels))

    def after_step(epoch: int, done: int) -> None:
        if moments is not None:
            moments["last_step"] = time.time()
            moments.setdefault("first_step", moments["last_step"])

    history = train_epochs(learner, lambda epoch: array_batches(split.images, split.labels, epoch, cfg, len(split.labels)),
                           cfg, after_step=after_step, device=device)
    return learner, history


def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int,
            device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Each image's predicted class, in batches."""
    model.eval()
    with torch.inference_mode():
        images = torch.from_numpy(images)
        return torch.cat([model(data.preprocess(images[i : i + batch_size].to(device))).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)]).numpy()


def predict_onnx(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> float:
    """Seconds to export the model to ONNX and predict `images` with ONNX Runtime (one thread per CPU); after the
    process's measured figures: its own, apart."""
    from clf import checkpoint
    from clf.predictor import OnnxEngine

    started = time.perf_counter()
    files = checkpoint.ModelFiles("plain", b"", {"classes": list(data.CLASSES)}, checkpoint.export_onnx(model))
    engine = OnnxEngine(files, threads=torch.get_num_threads())
    for i in range(0, len(images), batch_size):
        engine(images[i : i + batch_size]).argmax(1)
    return time.perf_counter() - started


def main() -> None:
    defaults = TrainConfig()
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the plain GPU loop")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed)
    moments = {"process": psutil.Process().create_time(), "imported": time.time()}

    dataset = data.load(args.data_dir)
    moments["data_loaded"] = time.time()
    # Training starts with the model and its optimizer, as in the Ray worker (building the first optimizer
    # of a process imports torch._dynamo).
    train_started = time.perf_counter()
    learner, history = train(cfg, new_model(cfg, len(data.CLASSES)), dataset.train, moments, device)
    train_s = time.perf_counter() - train_started

    infer_started = time.perf_counter()
    predictions = predict(learner.model, dataset.test.images, cfg.infer_batch_size, device)
    infer_s = time.perf_counter() - infer_started
    moments["evaluated"] = time.time()
    infer_onnx_s = predict_onnx(learner.model, dataset.test.images, cfg.infer_batch_size) if device.type == "cpu" else None
    scores = metrics.compute(dataset.test.labels, predictions, len(data.CLASSES))
    print(json.dumps({
        "train_s": train_s,
        "infer_s": infer_s,
        "infer_onnx_s": infer_onnx_s,
        "in_process_s": time.perf_counter() - STARTED,
        "accuracy": scores.accuracy,
        "history": history,
        "threads": torch.get_num_threads(),
        "moments": moments,
    }))


if __name__ == "__main__":
    main()
