"""Photos at scale: how fast a store's large product photos are read and converted, by the conversion alone,
by a plain process pool, by the training job's Ray Data pass and by `jobs/tag.py` end to end, and how much
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


def tag_listing(folder: Path, rows: int, tmp: Path, env: dict) -> tuple[dict, float, int]:
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    listing = tmp / f"listing-{rows}.parquet"
    pd.DataFrame({"path": (files * (rows // len(files) + 1))[:rows]}).to_parquet(listing)
    checkpoint = tmp / "checkpoint"
    if not checkpoint.exists():
        subprocess.run([PY, "-m", "tests.programs", "untrained-checkpoint", str(checkpoint)], cwd=ROOT, check=True)
    out = tmp / f"tags-{rows}"
    _, wall, peak = run_job(["jobs/tag.py", "--checkpoint", str(checkpoint), "--input", str(listing),
                             "--output", str(out)], env)
    return json.loads((out / "summary.json").read_text()), wall, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=2000, help="photos made and read (at most 4,000)")
    p.add_argument("--listed", type=int, default=20_000, help="rows of the listing tagged end to end (the photos "
                   "listed again and again)")
    p.add_argument("--memory-rows", type=int, nargs="*", default=[100_000, 200_000],
                   help="listings tagged while the driver's peak memory is sampled (none: skip)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "clf" / "ingest")
    args = p.parse_args()
    cores = os.cpu_count()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    folder = photos_folder(args.cache, args.photos)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    print(f"machine: {cpu_model()}, {cores} CPUs; {len(paths):,} JPEG photos of about 1000 px")

    sample = paths[:200]
    whole = one_process(sample, None)
    scaled = one_process(sample, photos.DECODE_SIDE)
    print(f"conversion, one process: {scaled:,.0f} photos/s decoding at {photos.DECODE_SIDE} px and more; "
          f"{whole:,.0f} photos/s decoding whole ({scaled / whole:.1f}x)")
    plain = pool(paths, cores)
    print(f"conversion, a plain pool of {cores} processes: {plain:,.0f} photos/s")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rows in (len(paths), args.listed):
            # The folder itself, then a listing of the same photos again and again (labelled by their folder).
            source = str(folder)
            if rows != len(paths):
                source = str(tmp / f"train-{rows}.parquet")
                listed = (paths * (rows // len(paths) + 1))[:rows]
                pd.DataFrame({"path": listed, "label": [Path(p).parent.name for p in listed]}).to_parquet(source)
            out = tmp / f"train-{rows}"
            run_job(["jobs/train.py", "--train-data", source, "--epochs", "1", "--output", str(out),
                     "--storage-path", str(tmp / "storage")], env)
            m = json.loads((out / "metrics.json").read_text())
            read_s = m["timings"]["read_photos_s"]
            ray_pass = rows / read_s
            print(f"training job's Ray Data pass over {rows:,} photos: {read_s:.1f} s, {ray_pass:,.0f} photos/s "
                  f"({ray_pass / plain:.2f}x the plain pool); eval accuracy {m['accuracy']:.4f} on {m['count']} photos")

        summary, wall, peak = tag_listing(folder, args.listed, tmp, env)
        first = summary["first_batch"]
        after = (summary["files"] - first["files"]) / (summary["seconds"] - first["seconds"])
        print(f"jobs/tag.py, a listing of {summary['files']:,} rows: {summary['files'] / summary['seconds']:,.0f} "
              f"photos/s in all ({first['seconds']:.1f} s to the first batch), {after:,.0f} photos/s after "
              f"it ({after / plain:.2f}x the plain pool); whole process {wall:.1f} s; driver peak "
              f"{peak / 2**20:,.0f} MiB")
        for rows in args.memory_rows:
            summary, wall, peak = tag_listing(folder, rows, tmp, env)
            print(f"jobs/tag.py, a listing of {rows:,} rows: driver peak {peak / 2**30:.2f} GiB "
                  f"({summary['files'] / summary['seconds']:,.0f} photos/s, whole process {wall:.0f} s)")


if __name__ == "__main__":
    main()
