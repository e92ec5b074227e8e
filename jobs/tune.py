"""Search the training settings with Ray Tune on a validation split, then train the best as a normal run.

    python jobs/tune.py [--trials 8] [--epochs 2] [--train-data PHOTOS] [--output runs/NAME] ...

Each trial is a training run of its own (the job's TorchTrainer) on the training data less a validation split;
ASHA stops the weaker ones early; the best validation accuracy wins. --output receives the best settings'
usual run outputs and trials.csv. Locally it starts an embedded Ray; with RAY_ADDRESS set (`ray job submit`)
it joins that cluster. Exit codes: 0 done, 1 the search failed, 2 a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from clf import cli  # noqa: E402
from clf.config import TuneConfig  # noqa: E402


def tune(cfg: TuneConfig) -> str:
    from clf import report, search  # here, not above: --help and usage errors answer before Ray and torch load

    output, table = search.run(cfg)
    best = table.head(5).drop(columns=["error"])
    return f"{report.text_table(best)}\noutputs in {output}: trials.csv, report.html, metrics.json, checkpoint/"


if __name__ == "__main__":
    cli.exit_now(cli.main("tune.py", TuneConfig, "Search the clothing classifier's training settings with Ray Tune, then "
                    "train the best.", tune))
