"""Ray's cost on one machine, against the targets of issue 12: the same training run as a plain PyTorch
process and through clf's Ray path (`jobs/train.py`), each a whole process, interleaved (plain, Ray,
tagging; plain, Ray, tagging; ...) in one invocation, one seed per repeat; the medians are compared.

    .venv/bin/python benchmarks/overhead.py [--repeats 3] [--epochs 2] [--tag-images 100000]

- loop per epoch: first batch to last optimizer step of an epoch (`loop_s` of each epoch's record: the same
  `clf.train.train_epoch` on both sides; report and checkpoint excluded), median over every epoch;
- fit: Ray's `timings.train_s` (the whole `TorchTrainer.fit()`) against the plain process's training
  (model, optimizer and every epoch);
- whole: wall seconds of each process, start to exit;
- tagging: `benchmarks/tagging.py`, Ray Data's predictor against a plain torch loop over the same
  in-memory images (actor start-up included);
- peak memory: the proportional set size (PSS: shared pages split between the processes sharing them)
  summed over the process and all its descendants (for Ray: driver, Ray's servers, every worker), sampled
  every half second in one more run of each side, not timed: one sample of the Ray run's 24 processes
  takes about 0.1 s of CPU (reading every mapping of every process), which slowed the timed Ray loop by
  up to a third when the timed runs were sampled;
- accuracy: the Ray run's test accuracy, median over the seeds.

The CPU model is printed with the figures: the ratios move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Issue 12's targets: (what, how the figure compares, the bound).
TARGETS = {
    "loop per epoch, Ray / plain": ("<=", 1.05),
    "fit() / plain training": ("<=", 1.5),
    "whole process, Ray / plain": ("<=", 1.8),
    "tagging, Ray Data / plain": (">=", 0.9),
    "peak memory of the Ray run, GiB": ("<", 3.0),
    "test accuracy, median of the seeds": (">=", 0.920),
}


class PeakMemory:
    def __init__(self, pid: int, interval: float = 0.5):
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


def timed(cmd: list[str], env: dict, memory: bool = False) -> tuple[float, int, str]:
    """Wall seconds, peak memory in bytes (if `memory`; else 0) and stdout of a whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    sampler = PeakMemory(proc.pid) if memory else None
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    peak = sampler.stop() if sampler else 0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, peak, out


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def cpu_model() -> str:
    """The processor's name: the ratios move with it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def plain_run(epochs: int, seed: int, env: dict, memory: bool = False) -> dict:
    wall, peak, out = timed([PY, "benchmarks/plain_torch.py", "--epochs", str(epochs), "--seed", str(seed)], env, memory)
    r = last_json(out)
    return {"train_s": r["train_s"], "wall_s": wall, "peak_bytes": peak, "accuracy": r["accuracy"],
            "loops": [e["loop_s"] for e in r["history"]]}


def ray_run(epochs: int, seed: int, env: dict, memory: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "run"
        wall, peak, _ = timed([PY, "jobs/train.py", "--epochs", str(epochs), "--seed", str(seed), "--output",
                               str(out_dir), "--storage-path", str(Path(tmp) / "ray")], env, memory)
        m = json.loads((out_dir / "metrics.json").read_text())
    return {"train_s": m["timings"]["train_s"], "wall_s": wall, "peak_bytes": peak, "accuracy": m["accuracy"],
            "loops": [e["loop_s"] for e in m["history"]], "timings": m["timings"]}


def tagging_run(images: int, env: dict) -> dict:
    _, _, out = timed([PY, "benchmarks/tagging.py", "--images", str(images)], env)
    return last_json(out)


def median(values) -> float:
    return statistics.median(list(values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; repeat i uses seed i")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tag-images", type=int, default=100_000, help="images for the tagging comparison (0: skip)")
    args = p.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}

    plain, ray, tagging = [], [], []
    for seed in range(args.repeats):
        plain.append(plain_run(args.epochs, seed, env))
        ray.append(ray_run(args.epochs, seed, env))
        if args.tag_images:
            tagging.append(tagging_run(args.tag_images, env))
        print(f"repeat {seed + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    peak_plain = plain_run(args.epochs, 0, env, memory=True)["peak_bytes"]
    peak_ray = ray_run(args.epochs, 0, env, memory=True)["peak_bytes"]

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"{args.epochs} epoch(s), {args.repeats} interleaved repeat(s) (seeds 0-{args.repeats - 1})")
    print(f"{'seed':>4}  {'':5}  {'loop s/epoch':>14}  {'train s':>8}  {'whole s':>8}  {'accuracy':>8}")
    for seed, pair in enumerate(zip(plain, ray)):
        for name, r in zip(("plain", "ray"), pair):
            loops = " ".join(f"{s:.2f}" for s in r["loops"])
            print(f"{seed:>4}  {name:5}  {loops:>14}  {r['train_s']:8.1f}  {r['wall_s']:8.1f}  {r['accuracy']:8.4f}")
    print(f"peak memory (one more run each, sampled): plain {peak_plain / 2**30:.2f} GiB, Ray {peak_ray / 2**30:.2f} GiB")
    phases = {k: round(median(r["timings"][k] for r in ray), 1) for k in ray[0]["timings"]}
    print(f"Ray run's phases, median s: {phases}")
    for t in tagging:
        print(f"tagging {t['images']:,} images: Ray Data {t['ray_images_per_s']:,.0f} images/s (first batch after "
              f"{t['ray_first_batch_s']:.1f} s, then {t['ray_after_first_images_per_s']:,.0f} images/s), "
              f"plain {t['plain_images_per_s']:,.0f} images/s")

    figures = {
        "loop per epoch, Ray / plain": median(s for r in ray for s in r["loops"]) / median(s for r in plain for s in r["loops"]),
        "fit() / plain training": median(r["train_s"] for r in ray) / median(r["train_s"] for r in plain),
        "whole process, Ray / plain": median(r["wall_s"] for r in ray) / median(r["wall_s"] for r in plain),
        "tagging, Ray Data / plain": median(t["ray_images_per_s"] / t["plain_images_per_s"] for t in tagging) if tagging else None,
        "peak memory of the Ray run, GiB": peak_ray / 2**30,
        "test accuracy, median of the seeds": median(r["accuracy"] for r in ray),
    }
    print(f"\n{'target':36}  {'figure':>8}  {'bound':>8}  result")
    for name, (op, bound) in TARGETS.items():
        value = figures[name]
        if value is None:
            print(f"{name:36}  {'-':>8}  {op + ' ' + str(bound):>8}  not measured")
            continue
        met = value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound
        print(f"{name:36}  {value:8.3f}  {op + ' ' + str(bound):>8}  {'met' if met else 'SHORT'}")


if __name__ == "__main__":
    main()
