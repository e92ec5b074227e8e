"""Programs the tests run in a process of their own, as a user's script would be run.

    python -m tests.programs predict-without-ray CHECKPOINT IMAGES.npy
    python -m tests.programs untrained-checkpoint FOLDER
    python -m tests.programs step-page-faults {adaptive,kept,after-the-loop}
    python -m tests.programs refuse-unseen PATH...
"""

from __future__ import annotations

import argparse
import json
import sys


def predict_without_ray(checkpoint: str, images: str) -> None:
    """A checkpoint's predictions for images saved with numpy, in a process that never imports Ray."""
    import numpy as np
    import torch

    from clf.checkpoint import load_model
    from clf.data import preprocess

    model, _ = load_model(checkpoint)
    assert "ray" not in sys.modules, "loading a checkpoint must not need Ray"
    print(json.dumps(model(preprocess(torch.from_numpy(np.load(images)))).argmax(1).tolist()))


def untrained_checkpoint(folder: str) -> None:
    """A checkpoint of the untrained model: enough where only the rows count, not the tags."""
    import torch

    from clf import checkpoint, data
    from clf.model import FashionCNN

    torch.manual_seed(0)
    checkpoint.save(folder, FashionCNN(), data.CLASSES)


def step_page_faults(malloc: str) -> None:
    """Page faults of 30 steps that each take 32 MiB in 4 MiB blocks from malloc, write them and free them
    (what a training step's activations and gradients do), with glibc's adaptive thresholds or after
    `clf.loop.keep_freed_memory` (which cannot be undone in a process)."""
    import ctypes
    import resource

    from clf.loop import keep_freed_memory

    if malloc == "kept":
        assert keep_freed_memory()
    if malloc == "after-the-loop":  # a short training loop, as a worker runs it (which should keep it too)
        import numpy as np

        from clf.config import TrainConfig
        from clf.loop import array_batches, make_learner, new_model, train_epochs

        cfg = TrainConfig(epochs=1, batch_size=32)
        images, labels = np.zeros((64, 28, 28), np.uint8), np.arange(64) % 10
        learner = make_learner(cfg, new_model(cfg, 10), 64)
        train_epochs(learner, lambda epoch: array_batches(images, labels, epoch, cfg, 64), cfg)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 4 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        blocks = [libc.malloc(size) for _ in range(8)]
        for block in blocks:
            ctypes.memset(block, 1, size)
        for block in blocks:
            libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)


def refuse_unseen(paths: list[str]) -> None:
    """Join the cluster in RAY_ADDRESS and ask every node to find `paths`; prints "seen everywhere", or the
    refusal."""
    from clf import cluster, session
    from clf.errors import ConfigError

    session.connect()
    try:
        cluster.refuse_unseen(cluster.cluster_nodes(), paths, "the paths")
        print("seen everywhere")
    except ConfigError as e:
        print(f"refused: {e}")


def main() -> None:
    p = argparse.ArgumentParser()
    commands = p.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict-without-ray")
    predict.add_argument("checkpoint")
    predict.add_argument("images")
    untrained = commands.add_parser("untrained-checkpoint")
    untrained.add_argument("folder")
    faults = commands.add_parser("step-page-faults")
    faults.add_argument("malloc", choices=["adaptive", "kept", "after-the-loop"])
    unseen = commands.add_parser("refuse-unseen")
    unseen.add_argument("paths", nargs="+")
    args = p.parse_args()
    if args.command == "predict-without-ray":
        predict_without_ray(args.checkpoint, args.images)
    elif args.command == "refuse-unseen":
        refuse_unseen(args.paths)
    elif args.command == "step-page-faults":
        step_page_faults(args.malloc)
    else:
        untrained_checkpoint(args.folder)


if __name__ == "__main__":
    main()
