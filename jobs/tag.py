"""Tag product photos with a trained checkpoint: one row per file (tag, confidence, top 3, review flag, error).

    python jobs/tag.py --checkpoint runs/NAME/checkpoint --input PHOTOS --output OUT [--format csv] ...

PHOTOS is a folder (every file in it and below) or a .parquet / .csv file with a `path` column. Locally it
starts an embedded Ray; with RAY_ADDRESS set (as `ray job submit` sets it) it joins that cluster. Exit
codes: 0 done (files that could not be tagged have their rows, with the reason), 1 the run failed, 2 a
usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from clf.cli import fraction, parse_config, positive_int, run_job  # noqa: E402
from clf.config import TAG_FORMATS, TagConfig  # noqa: E402

DEFAULTS = TagConfig(checkpoint="-", input="-", output="-")


def parse_args(argv=None) -> TagConfig:
    p = argparse.ArgumentParser(
        description="Tag product photos with a trained clothing classifier (Ray Data batch inference).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a training run's checkpoint folder (runs/NAME/checkpoint)")
    p.add_argument("--input", required=True,
                   help="folder of photos (JPEG, PNG, WebP), or a .parquet/.csv file with a `path` column")
    p.add_argument("--output", required=True, help="new folder for the tags")
    p.add_argument("--format", choices=TAG_FORMATS, default=DEFAULTS.format, help="tags.parquet or tags.csv")
    p.add_argument("--review-threshold", type=fraction, default=DEFAULTS.review_threshold,
                   help="rows with a confidence below this get needs_review")
    p.add_argument("--num-actors", type=positive_int, default=None,
                   help="predictor actors (default: one per CPU but one, or one per GPU with --use-gpu)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help="photos per batch")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per predictor actor")
    return parse_config(p, TagConfig, argv)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from clf.tag import run, summary

    code, result = run_job("tag.py", lambda: run(cfg))
    if result is not None:
        print(summary(result, cfg.review_threshold))
        print(f"tags in {result.output / cfg.tags_name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
