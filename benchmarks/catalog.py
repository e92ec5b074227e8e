"""Training on a store's catalog: how fast the read pass (Ray tasks) reads and converts photos, and how long the
training workers wait for data. Generated photos (Fashion-MNIST test images rendered as product photos,
four classes), `jobs/train.py --train-data` as a whole process. Figures, not pass/fail.

    .venv/bin/python benchmarks/catalog.py [--photos 2000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import cpu_model  # noqa: E402
from clf import data  # noqa: E402
from tests.catalog import STORE_CLASSES, write_labelled_catalog  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=2000, help="photos in the catalog, split over its 4 classes (at most 4,000: 1,000 test images a class)")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    test = data.load().test
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "catalog"
        write_labelled_catalog(folder, test.images, test.labels, per_class=args.photos // len(STORE_CLASSES))
        files = sum(1 for f in folder.rglob("*") if f.is_file())
        out = Path(tmp) / "run"
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "jobs/train.py", "--train-data", str(folder), "--epochs", str(args.epochs),
             "--output", str(out), "--storage-path", str(Path(tmp) / "storage")],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"jobs/train.py failed:\n{proc.stderr[-3000:]}")
        m = json.loads((out / "metrics.json").read_text())
    history, timings = m["history"], m["timings"]
    epoch_s = [h["elapsed_s"] - (history[i - 1]["elapsed_s"] if i else 0) for i, h in enumerate(history)]
    waited = sum(h["data_wait_s"] for h in history)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs")
    print(f"catalog: {files:,} photos, {len(m['classes'])} classes; plan {m['plan']['training']}")
    print(f"read and convert (one pass of Ray tasks, Ray already up): {timings['read_photos_s']:.1f} s, "
          f"{files / timings['read_photos_s']:,.0f} photos/s")
    for h, seconds in zip(history, epoch_s):
        print(f"epoch {h['epoch']}: {seconds:.2f} s, rank 0 waited {h['data_wait_s']:.2f} s for data "
              f"({h['data_wait_s'] / seconds:.1%}), {h['images_per_s']:,.0f} images/s")
    print(f"training loop waited for data {waited / sum(epoch_s):.1%} of its time; fit() {timings['train_s']:.1f} s; "
          f"whole job {wall:.1f} s; eval accuracy {m['accuracy']:.4f} on {m['count']} photos")


if __name__ == "__main__":
    main()
