"""One predictor, used by test-set evaluation, catalog tagging and serving alike, with two engines: ONNX Runtime
on CPUs (the checkpoint's model.onnx), torch on a GPU. On the CPU path neither this module nor anything it
imports brings torch: a predictor actor or a replica starts in a fraction of the time and memory.

`Predictor` is a callable class for Ray Data's `map_batches` (each actor of the pool builds its engine once,
from the checkpoint's files that the driver read and put in Ray's object store: on a cluster whose nodes share
no disk, a path would name a folder on the driver's disk only) and what a Serve replica calls on its batches.
Every column but `image` passes through untouched, so the row's id and label travel with its prediction whatever
order Ray Data delivers the rows in.
"""

from __future__ import annotations

import numpy as np
import ray

from clf.checkpoint import ModelFiles
from clf.errors import CheckpointError, first_line


class OnnxEngine:
    """The checkpoint's ONNX model in ONNX Runtime, on `threads` threads (the CPUs its actor or replica holds:
    Ray sets OMP_NUM_THREADS=1 in its workers, whatever they were given)."""

    def __init__(self, files: ModelFiles, threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = max(1, threads), 1
        try:
            self.session = onnxruntime.InferenceSession(files.onnx, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors (InvalidGraph, Fail, ...): a bad file
            raise CheckpointError(f"{files.location}: its ONNX model cannot be loaded ({first_line(e)})") from None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": images})[0]


class TorchEngine:
    """The checkpoint's torch model on the GPU (onnxruntime-gpu is a wheel of its own with its own CUDA pins: not
    worth it for a model this small)."""

    def __init__(self, files: ModelFiles, threads: int = 1):
        import torch

        from clf.checkpoint import build, inference_model

        torch.set_num_threads(max(1, threads))
        self.torch, self.device = torch, torch.device("cuda")
        self.model = inference_model(build(files, self.device)[0])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(images).to(self.device)).cpu().numpy()


class Predictor:
    def __init__(self, model: ModelFiles | ray.ObjectRef, use_gpu: bool = False, num_threads: int | None = None,
                 top_k: int = 0):
        """`model`: a checkpoint's files, or the object-store reference the driver put them under. `num_threads`:
        the CPUs this actor or replica holds. `top_k` > 0 adds the k likeliest classes per row."""
        files = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.top_k, self.classes = top_k, len(files.classes)
        self.engine = (TorchEngine if use_gpu else OnnxEngine)(files, num_threads or 1)
        # Where this actor runs, on every row it predicts (metrics.json's placement).
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.node = context.get_node_id() if context else ""
        self.actor = (context.get_actor_id() or "") if context else ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(batch.pop("image"), dtype=np.uint8).reshape(-1, 28, 28)
        probabilities = self.engine(images)
        # The k likeliest, likeliest first (torch.topk's order; ties, which a softmax all but never has, by index).
        top_classes = np.argsort(-probabilities, axis=1, kind="stable")[:, :max(1, self.top_k)]
        top_probs = np.take_along_axis(probabilities, top_classes, axis=1).astype(np.float32)
        batch["prediction"] = top_classes[:, 0].astype(np.int64)
        batch["confidence"] = top_probs[:, 0]
        batch["node"] = np.full(len(images), self.node, dtype=object)
        batch["actor"] = np.full(len(images), self.actor, dtype=object)
        if self.top_k:
            batch["top_classes"] = top_classes.astype(np.int64)  # (N, top_k), likeliest first
            batch["top_probs"] = top_probs
        return batch


def check(files: ModelFiles) -> None:
    """CheckpointError unless the checkpoint's model loads and gives a probability for each of its classes: what a
    driver checks before it starts any actor or replica."""
    out = OnnxEngine(files)(np.zeros((1, 28, 28), np.uint8))
    if out.shape != (1, len(files.classes)):
        raise CheckpointError(f"checkpoint {files.location} names {len(files.classes)} classes for a model of "
                              f"{out.shape[-1]} outputs")
