"""Ray's cost on one machine: the same training run as plain PyTorch and through clf's Ray path, each a
whole process, in one invocation; plus tagging throughput of Ray Data against a plain torch loop.

    .venv/bin/python benchmarks/overhead.py [--epochs 2] [--seeds 0]

Figures, not pass/fail. Peak memory is the proportional set size (PSS: shared pages split between the
processes that share them) summed over the process and all its descendants (for the Ray run: the
driver, Ray's own servers and every worker), sampled once a second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


class PeakMemory:
    def __init__(self, pid: int, interval: float = 1.0):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak memory (bytes) and stdout of a whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    memory = PeakMemory(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    peak = memory.stop()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, peak, out


def cpu_model() -> str:
    """The processor's name: the ratios move with it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tag-images", type=int, default=100_000, help="images for the tagging comparison")
    args = p.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}

    rows = []
    for seed in args.seeds:
        wall, peak, out = timed([PY, "benchmarks/plain_torch.py", "--epochs", str(args.epochs), "--seed", str(seed)], env)
        plain = json.loads(out.strip().splitlines()[-1]) | {"wall_s": wall, "peak_bytes": peak}
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = Path(tmp) / "run"
            cmd = [PY, "jobs/train.py", "--epochs", str(args.epochs), "--seed", str(seed), "--output", str(out_dir),
                   "--storage-path", str(Path(tmp) / "ray")]
            wall, peak, _ = timed(cmd, env)
            m = json.loads((out_dir / "metrics.json").read_text())
        ray_run = {"train_s": m["timings"]["train_s"], "wall_s": wall, "peak_bytes": peak, "accuracy": m["accuracy"],
                   "timings": m["timings"]}
        rows.append((seed, plain, ray_run))

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"epochs {args.epochs}")
    print(f"{'seed':>4}  {'':5}  {'train s':>8}  {'whole s':>8}  {'peak GiB':>8}  {'accuracy':>8}")
    for seed, plain, ray_run in rows:
        for name, r in (("plain", plain), ("ray", ray_run)):
            print(f"{seed:>4}  {name:5}  {r['train_s']:8.1f}  {r['wall_s']:8.1f}  {r['peak_bytes'] / 2**30:8.2f}  {r['accuracy']:8.4f}")
        print(f"{seed:>4}  ratio  {ray_run['train_s'] / plain['train_s']:8.2f}x {ray_run['wall_s'] / plain['wall_s']:8.2f}x")
        print(f"      ray phases: {ray_run['timings']}")
    accuracies = sorted(r["accuracy"] for _, _, r in rows)
    print(f"ray accuracy median over {len(rows)} seed(s): {accuracies[len(accuracies) // 2]:.4f}")

    wall, peak, out = timed([PY, "benchmarks/tagging.py", "--images", str(args.tag_images)], env)
    t = json.loads(out.strip().splitlines()[-1])
    print(f"tagging {t['images']:,} images: ray data {t['ray_images_per_s']:,.0f} images/s, "
          f"plain torch {t['plain_images_per_s']:,.0f} images/s, ratio {t['ray_images_per_s'] / t['plain_images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
