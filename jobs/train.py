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
from clf.errors import run_job  # noqa: E402

DESCRIPTION = "Train the Fashion-MNIST clothing classifier with Ray Train and report test metrics."


def main(argv=None) -> int:
    cfg = cli.parse(TrainConfig, DESCRIPTION, argv)
    from clf import pipeline  # here, not above: --help and usage errors answer before Ray and torch load

    code, result = run_job("train.py", lambda: pipeline.run(cfg))
    if result is not None:
        print(f"outputs in {result.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
