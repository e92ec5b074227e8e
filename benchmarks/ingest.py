"""Photos at scale: how fast a store's large product photos are read and converted, by the conversion alone,
by a plain process pool, by the training job's read pass (Ray tasks) and by `jobs/tag.py` end to end, and how much
memory the tagging driver holds. Figures, not pass/fail; run on an otherwise idle machine.

    .venv/bin/python benchmarks/ingest.py [--photos 2000] [--listed 20000] [--memory-rows 100000 200000]

The photos (Fashion-MNIST test images rendered as 1000 px JPEG product photos, four classes) are made once
and kept in --cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import cpu_model  # noqa: E402
from clf import data, photos  # noqa: E402
from tests.catalog import LARGE, STORE_CLASSES, write_labelled_catalog  # noqa: E402

PY = sys.executable


def photos_folder(cache: Path, count: int) -> Path:
    folder = cache / f"catalog-{count}"
    if not (folder / ".complete").is_file():
        test = data.load().test
        print(f"making {count:,} photos of about 1000 px in {folder} (once)", flush=True)
        write_labelled_catalog(folder, test.images, test.labels, per_class=count // len(STORE_CLASSES), **LARGE)
        (folder / ".complete").write_text("")
    return folder


def convert_files(paths: list[str], side: int | None = photos.DECODE_SIDE) -> int:
    for path in paths:
        with open(path, "rb") as f:
            photos.load(f.read(), side)
    return len(paths)


def one_process(paths: list[str], side: int | None) -> float:
    started = time.perf_counter()
    convert_files(paths, side)
    return len(paths) / (time.perf_counter() - started)


def pool(paths: list[str], workers: int) -> float:
    """Photos/s of `workers` plain processes converting `paths` in chunks (the pool started beforehand)."""
    chunks = [paths[i::workers * 8] for i in range(workers * 8)]
    with ProcessPoolExecutor(workers) as executor:
        list(executor.map(convert_files, [paths[:workers]] * workers))  # started and imported
        started = time.perf_counter()
        done = sum(executor.map(convert_files, chunks))
        return done / (time.perf_counter() - started)


def run_job(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, int]:
    """A job as a process; its wall time and the driver's peak RSS (the process alone, not Ray's)."""
    started, peak = time.perf_counter(), 0
    proc = subprocess.Popen([PY, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed:\n{err[-3000:]}")
    return done, time.perf_counter() - started, peak


def tag_listing(folder: Path, rows: int, tmp: Path, env: dict, name: str) -> tuple[dict, float, int]:
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    listing = tmp / f"listing-{rows}.parquet"
    pd.DataFrame({"path": (files * (rows // len(files) + 1))[:rows]}).to_parquet(listing)
    checkpoint = tmp / "checkpoint"
    if not checkpoint.exists():
        subprocess.run([PY, "-m", "tests.programs", "untrained-checkpoint", str(checkpoint)], cwd=ROOT, check=True)
    out = tmp / f"tags-{name}"
    _, wall, peak = run_job(["jobs/tag.py", "--checkpoint", str(checkpoint), "--input", str(listing),
                             "--output", str(out)], env)
    return json.loads((out / "summary.json").read_text()), wall, peak


def train_pass(source: str, rows: int, tmp: Path, env: dict, name: str) -> tuple[float, dict]:
    out = tmp / name
    run_job(["jobs/train.py", "--train-data", source, "--epochs", "1", "--output", str(out),
             "--storage-path", str(tmp / "storage")], env)
    m = json.loads((out / "metrics.json").read_text())
    return rows / m["timings"]["read_photos_s"], m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=2000, help="photos made and read (at most 4,000)")
    p.add_argument("--listed", type=int, default=20_000, help="rows of the listings read by the training job and "
                   "tagged (the photos listed again and again)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the pool and the Ray jobs")
    p.add_argument("--memory-rows", type=int, nargs="*", default=[100_000, 200_000],
                   help="listings tagged while the driver's peak memory is sampled (none: skip)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "clf" / "ingest")
    args = p.parse_args()
    cores = os.cpu_count()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    folder = photos_folder(args.cache, args.photos)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    listed = (paths * (args.listed // len(paths) + 1))[:args.listed]
    print(f"machine: {cpu_model()}, {cores} CPUs; {len(paths):,} JPEG photos of about 1000 px; listings of "
          f"{len(listed):,} rows list them again and again")

    sample = paths[:200]
    whole = one_process(sample, None)
    scaled = one_process(sample, photos.DECODE_SIDE)
    print(f"conversion, one process: {scaled:,.0f} photos/s decoding at {photos.DECODE_SIDE} px and more; "
          f"{whole:,.0f} photos/s decoding whole ({scaled / whole:.1f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = str(tmp / "train-listing.parquet")
        pd.DataFrame({"path": listed, "label": [Path(p).parent.name for p in listed]}).to_parquet(listing)
        figures = {"pool": [], "pass": [], "pass_folder": [], "tag_after": [], "tag_all": [], "tag_first_s": []}
        for repeat in range(args.repeats):
            # Interleaved: the machine's speed drifts (seen here: the same pool at 566 and 966 photos/s).
            figures["pool"].append(pool(listed, cores))
            rate, m = train_pass(str(folder), len(paths), tmp, env, f"folder-{repeat}")  # a real held-out split
            figures["pass_folder"].append(rate)
            rate, _ = train_pass(listing, len(listed), tmp, env, f"listing-{repeat}")
            figures["pass"].append(rate)
            summary, wall, peak = tag_listing(folder, len(listed), tmp, env, f"{len(listed)}-{repeat}")
            first = summary["first_batch"]
            figures["tag_after"].append((summary["files"] - first["files"]) / (summary["seconds"] - first["seconds"]))
            figures["tag_all"].append(summary["files"] / summary["seconds"])
            figures["tag_first_s"].append(first["seconds"])
            print(f"repeat {repeat + 1}: pool {figures['pool'][-1]:,.0f}, training pass {figures['pass_folder'][-1]:,.0f} "
                  f"({len(paths):,} photos) and {figures['pass'][-1]:,.0f} ({len(listed):,}), tagging after the first "
                  f"batch {figures['tag_after'][-1]:,.0f} photos/s; driver peak {peak / 2**20:,.0f} MiB", flush=True)
        med = {k: float(np.median(v)) for k, v in figures.items()}
        print(f"\nmedians of {args.repeats}, photos/s:")
        print(f"  a plain pool of {cores} processes, the new conversion: {med['pool']:,.0f}")
        print(f"  training job's read pass (Ray tasks), {len(listed):,} photos: {med['pass']:,.0f} ({med['pass'] / med['pool']:.2f}x "
              f"the pool); {len(paths):,} photos: {med['pass_folder']:,.0f} ({med['pass_folder'] / med['pool']:.2f}x)")
        print(f"  jobs/tag.py, {len(listed):,} rows: {med['tag_after']:,.0f} after the first batch "
              f"({med['tag_after'] / med['pool']:.2f}x the pool); {med['tag_all']:,.0f} in all, "
              f"{med['tag_first_s']:.1f} s to the first batch")
        print(f"  evaluation accuracy of the last training run on the photos themselves (1 epoch): "
              f"{m['accuracy']:.4f} on {m['count']:,}")
        for rows in args.memory_rows:
            summary, wall, peak = tag_listing(folder, rows, tmp, env, str(rows))
            print(f"jobs/tag.py, a listing of {rows:,} rows: driver peak {peak / 2**30:.2f} GiB "
                  f"({summary['files'] / summary['seconds']:,.0f} photos/s, whole process {wall:.0f} s)")


if __name__ == "__main__":
    main()
