"""Train the clothing classifier on Fashion-MNIST with Ray Train, tag the test set with Ray Data, report.

    python jobs/train.py [--epochs 2] [--num-workers N] [--use-gpu] [--output runs/NAME] ...

Locally it starts an embedded Ray; with RAY_ADDRESS set (as `ray job submit` sets it) it joins that
cluster. Exit codes: 0 done, 1 the run failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from clf.cli import non_negative_int, parse_config, positive_float, positive_int, run_job  # noqa: E402
from clf.config import TrainConfig  # noqa: E402

DEFAULTS = TrainConfig()


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(
        description="Train the Fashion-MNIST clothing classifier with Ray Train and report test metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                   help="global batch size, split across workers")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS.lr, help="peak learning rate (one-cycle)")
    p.add_argument("--num-workers", type=positive_int, default=None,
                   help="training workers (default: 1 on CPU, one per GPU with --use-gpu)")
    p.add_argument("--min-workers", type=positive_int, default=None,
                   help="elastic training: go on with as few as this many workers when nodes are lost "
                        "(default: exactly --num-workers)")
    p.add_argument("--cpus-per-worker", type=positive_int, default=None,
                   help="CPUs and torch threads per worker (default: the cluster's CPUs / workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per training worker and inference actor")
    p.add_argument("--seed", type=non_negative_int, default=DEFAULTS.seed, help="random seed")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four Fashion-MNIST idx files (default: $CLF_DATA_DIR, "
                        "/usr/share/datasets/fashion-mnist, ~/.cache/clf/fashion-mnist)")
    p.add_argument("--download", action="store_true",
                   help="download the data with torchvision if it is found nowhere (needs internet)")
    p.add_argument("--output", default=None, help="new folder for the outputs (default: runs/<timestamp>)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train checkpoint storage; shared storage (s3://, NFS) on a multi-node cluster")
    p.add_argument("--run-name", default=None,
                   help="the run's name in --storage-path; the same name and storage resume the run from its "
                        "latest checkpoint (default: a new name for every run)")
    p.add_argument("--max-failures", type=non_negative_int, default=DEFAULTS.max_failures,
                   help="worker failures to recover from by restarting from the latest checkpoint")
    p.add_argument("--infer-batch-size", type=positive_int, default=DEFAULTS.infer_batch_size,
                   help="images per inference batch")
    p.add_argument("--num-infer-actors", type=positive_int, default=None,
                   help="inference actors (default: one per CPU, or per GPU with --use-gpu)")
    return parse_config(p, TrainConfig, argv)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from clf.job import run

    code, result = run_job("train.py", lambda: run(cfg))
    if result is not None:
        print(f"outputs in {result.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
