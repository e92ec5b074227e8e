"""Train the clothing classifier on Fashion-MNIST with Ray Train, tag the test set with Ray Data, report.

    python jobs/train.py [--epochs 2] [--num-workers N] [--use-gpu] [--output runs/NAME] ...

Locally it starts an embedded Ray; with RAY_ADDRESS set (as `ray job submit` sets it) it joins that
cluster. Exit codes: 0 done, 1 the run failed, 2 a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from clf import cli  # noqa: E402
from clf.config import TrainConfig  # noqa: E402


def train(cfg: TrainConfig) -> str:
    from clf import pipeline  # here, not above: --help and usage errors answer before Ray and torch load

    return f"outputs in {pipeline.run(cfg).output}: report.html (the run's report), metrics.json, predictions.parquet, checkpoint/"


if __name__ == "__main__":
    cli.exit_now(cli.main("train.py", TrainConfig, "Train the Fashion-MNIST clothing classifier with Ray Train and "
                    "report test metrics.", train))
