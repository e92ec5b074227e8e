"""Tag product photos with a trained checkpoint: one row per file (tag, confidence, top 3, review flag, error),
and review.html, the page where a person reviews the photos the model is unsure of.

    python jobs/tag.py --checkpoint runs/NAME/checkpoint --input PHOTOS --output OUT [--format csv] ...

PHOTOS is a folder (every file in it and below) or a .parquet / .csv file with a `path` column. Locally it
starts an embedded Ray; with RAY_ADDRESS set (as `ray job submit` sets it) it joins that cluster. Exit
codes: 0 done (files that could not be tagged have their rows, with the reason), 1 the run failed, 2 a
usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from clf import cli  # noqa: E402
from clf.config import TagConfig  # noqa: E402


def tag(cfg: TagConfig) -> str:
    from clf.tagging import pipeline  # here, not above: --help and usage errors answer before Ray and torch load

    result = pipeline.run(cfg)
    output = result.output.rstrip("/")
    return (f"{pipeline.summary(result, cfg.review_threshold)}\ntags in {output}/{cfg.tags_name}; the photos to review "
            f"in {output}/review.html")


if __name__ == "__main__":
    cli.exit_now(cli.main("tag.py", TagConfig, "Tag product photos with a trained clothing classifier (Ray Data batch "
                    "inference).", tag))
