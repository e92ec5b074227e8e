"""Tag product photos with a trained checkpoint: one row per file (tag, confidence, top 3, review flag, error).

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
from clf.errors import run_job  # noqa: E402

DESCRIPTION = "Tag product photos with a trained clothing classifier (Ray Data batch inference)."


def main(argv=None) -> int:
    cfg = cli.parse(TagConfig, DESCRIPTION, argv)
    from clf.tagging import pipeline  # here, not above: --help and usage errors answer before Ray and torch load

    code, result = run_job("tag.py", lambda: pipeline.run(cfg))
    if result is not None:
        print(pipeline.summary(result, cfg.review_threshold))
        print(f"tags in {result.output / cfg.tags_name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
