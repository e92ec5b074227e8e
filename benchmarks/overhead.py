"""Ray's cost on one machine: the same training run as a plain PyTorch process and through clf's Ray path
(`jobs/train.py`), each a whole process, interleaved (plain, Ray, tagging; plain, Ray, tagging; ...) in one
invocation, one seed per repeat; the medians are compared with the targets of issues 21 and 28.

    .venv/bin/python benchmarks/overhead.py [--repeats 3] [--epochs 2] [--tag-images 100000]

- loop per epoch: first batch to last optimizer step of an epoch (`loop_s` of each epoch's record: the same
  `clf.loop.train_epoch` on both sides; report and checkpoint excluded), median over every epoch;
- fit: Ray's `timings.train_s` (the whole `TorchTrainer.fit()`) against the plain process's training
  (model, optimizer and every epoch);
- whole: wall seconds of each process, start to exit;
- phases, side by side: before the first optimizer step, the loop (first to last step), and after the last
  step, for the plain process and for the Ray run (whose start-up is broken down further from metrics.json:
  Ray's start, fit() called to rank 0's process, to its training function, to its data in memory, to its first
  step; and after training: fit()'s return, evaluation, writing, the process's end);
- evaluation: the Ray run's evaluation phase (Ray Data's predictor actors on ONNX Runtime, their start
  included) beside the plain process's prediction of the test set with torch and with ONNX Runtime;
- tagging: `benchmarks/tagging.py`, Ray Data's predictor (ONNX Runtime) against a plain torch loop and a plain
  ONNX Runtime loop over the same in-memory images (actor start-up included), and the seconds from the pool's
  start to its first batch;
- peak memory: the proportional set size (PSS: shared pages split between the processes sharing them) of
  the process and all its descendants (for Ray: driver, Ray's servers, every worker and actor), sampled every
  half second in one more run of each side, not timed (reading every mapping of every process takes CPU);
  the peak of the sum, and what each process held at that moment;
- accuracy: the Ray run's test accuracy against the plain run's, same seed (the same batches in the same order
  with one worker: they should be equal).

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
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import with_descendants  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# The targets (issues 21 and 28): (what, how the figure compares, the bound).
TARGETS = {
    "loop per epoch, Ray / plain": ("<=", 1.10),
    "fit() / plain training": ("<=", 1.8),
    "whole process, Ray / plain": ("<=", 1.5),
    "evaluation phase s": ("<=", 3.0),
    "peak memory of the Ray run, GiB": ("<=", 2.0),
    "tagging, Ray Data / plain torch": (">=", 1.5),
    "tagging, Ray Data / plain ONNX Runtime": (">=", 0.9),
    "tagging, first batch s": ("<=", 3.0),
    "test accuracy, Ray - plain": ("==", 0.0),
}


def process_name(p: psutil.Process) -> str:
    """Ray's actors and workers by their Ray names (ray::RayTrainWorker); other processes by their program
    (raylet, gcs_server) or the Python script they run (log_monitor.py)."""
    name = p.name()
    if name.startswith("ray::") or not name.startswith("python"):
        return name.split(".")[0]
    scripts = [Path(a).name for a in p.cmdline()[1:] if a.endswith(".py")]
    return scripts[0] if scripts else name


class PeakMemory:
    """The peak of the summed PSS of a process and its descendants, with each process's share at that moment."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval, self.peak, self.at_peak = pid, interval, 0, Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> Counter:
        shares = Counter()
        for p in with_descendants(self.pid):
            try:
                shares[process_name(p)] += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return shares

    def _run(self) -> None:
        while not self._stop.is_set():
            shares = self._sample()
            if sum(shares.values()) > self.peak:
                self.peak, self.at_peak = sum(shares.values()), shares
            self._stop.wait(self.interval)

    def stop(self) -> tuple[int, Counter]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.at_peak


def timed(cmd: list[str], env: dict, memory: bool = False) -> tuple[float, float, tuple[int, Counter], str]:
    """Start time (unix), wall seconds, peak memory (if `memory`) and stdout of a whole process."""
    started_at, started = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    sampler = PeakMemory(proc.pid) if memory else None
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    peak = sampler.stop() if sampler else (0, Counter())
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return started_at, wall, peak, out


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def cpu_model() -> str:
    """The processor's name: the ratios move with it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def plain_run(epochs: int, seed: int, env: dict, memory: bool = False) -> dict:
    started_at, wall, peak, out = timed([PY, "benchmarks/plain_torch.py", "--epochs", str(epochs), "--seed", str(seed)],
                                        env, memory)
    r = last_json(out)
    m = r["moments"]
    wall -= r["infer_onnx_s"]  # its ONNX Runtime figure, measured at the end of the process, is not the baseline's
    ended = started_at + wall
    return {"train_s": r["train_s"], "wall_s": wall, "peak": peak, "accuracy": r["accuracy"],
            "loops": [e["loop_s"] for e in r["history"]], "infer_s": r["infer_s"], "infer_onnx_s": r["infer_onnx_s"],
            "phases": {"before the first step": m["first_step"] - started_at,
                       "loop: first to last step": m["last_step"] - m["first_step"],
                       "after the last step": ended - m["last_step"]}}


def ray_run(epochs: int, seed: int, env: dict, memory: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "run"
        started_at, wall, peak, _ = timed([PY, "jobs/train.py", "--epochs", str(epochs), "--seed", str(seed),
                                           "--output", str(out_dir), "--storage-path", str(Path(tmp) / "ray")],
                                          env, memory)
        m = json.loads((out_dir / "metrics.json").read_text())
    t, line = m["timings"], m["training_timeline"]
    fit_called, ended = line["fit_called_at"], started_at + wall
    first_step, last_step = fit_called + line["first_step"], fit_called + line["last_step"]
    return {"train_s": t["train_s"], "wall_s": wall, "peak": peak, "accuracy": m["accuracy"],
            "loops": [e["loop_s"] for e in m["history"]], "inference_s": t["inference_s"],
            "phases": {"before the first step": first_step - started_at,
                       "  to fit() called (imports, data, Ray)": fit_called - started_at,
                       "    of which Ray's start": t["ray_start_s"],
                       "  fit() called to rank 0's process": line["process"],
                       "  its process to its training function": line["train_fn"] - line["process"],
                       "  its training function to its data": line["shard_in_memory"] - line["train_fn"],
                       "  its data to its first step": line["first_step"] - line["shard_in_memory"],
                       "loop: first to last step": last_step - first_step,
                       "after the last step": ended - last_step,
                       "  last step to fit() returned": line["fit_returned"] - line["last_step"],
                       "  evaluation": t["inference_s"],
                       "  outputs written, the process's end": ended - (fit_called + line["fit_returned"])
                       - t["inference_s"]}}


def tagging_run(images: int, env: dict) -> dict:
    _, _, _, out = timed([PY, "benchmarks/tagging.py", "--images", str(images)], env)
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
    peak_plain, _ = plain_run(args.epochs, 0, env, memory=True)["peak"]
    peak_ray, shares = ray_run(args.epochs, 0, env, memory=True)["peak"]

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"{args.epochs} epoch(s), {args.repeats} interleaved repeat(s) (seeds 0-{args.repeats - 1})")
    print(f"{'seed':>4}  {'':5}  {'loop s/epoch':>14}  {'train s':>8}  {'whole s':>8}  {'accuracy':>8}")
    for seed, pair in enumerate(zip(plain, ray)):
        for name, r in zip(("plain", "ray"), pair):
            loops = " ".join(f"{s:.2f}" for s in r["loops"])
            print(f"{seed:>4}  {name:5}  {loops:>14}  {r['train_s']:8.1f}  {r['wall_s']:8.1f}  {r['accuracy']:8.4f}")

    print(f"\nphases, median s{'':24}  {'plain':>7}  {'Ray':>7}")
    for phase in ray[0]["phases"]:
        theirs = f"{median(r['phases'][phase] for r in plain):7.1f}" if phase in plain[0]["phases"] else f"{'':7}"
        print(f"  {phase:38}  {theirs}  {median(r['phases'][phase] for r in ray):7.1f}")

    print(f"\npeak memory (one more run each, sampled): plain {peak_plain / 2**30:.2f} GiB, Ray {peak_ray / 2**30:.2f} GiB; "
          "the Ray run's processes at its peak, MiB:")
    for name, pss in shares.most_common():
        print(f"  {name:40} {pss / 2**20:7.0f}")
    print(f"\nthe test set's 10,000 images predicted, median s: plain torch {median(r['infer_s'] for r in plain):.2f}, "
          f"plain ONNX Runtime (export included) {median(r['infer_onnx_s'] for r in plain):.2f}; the Ray run's "
          f"evaluation phase (ONNX Runtime in Ray Data's actors, their start included) "
          f"{median(r['inference_s'] for r in ray):.2f}")
    for t in tagging:
        print(f"tagging {t['images']:,} images: Ray Data {t['ray_images_per_s']:,.0f} images/s ({t['ray_actors']} "
              f"actor(s); first batch after {t['ray_first_batch_s']:.1f} s, then {t['ray_after_first_images_per_s']:,.0f} "
              f"images/s), plain torch {t['plain_torch_images_per_s']:,.0f}, plain ONNX Runtime "
              f"{t['plain_onnx_images_per_s']:,.0f} images/s")

    figures = {
        "loop per epoch, Ray / plain": median(s for r in ray for s in r["loops"]) / median(s for r in plain for s in r["loops"]),
        "fit() / plain training": median(r["train_s"] for r in ray) / median(r["train_s"] for r in plain),
        "whole process, Ray / plain": median(r["wall_s"] for r in ray) / median(r["wall_s"] for r in plain),
        "evaluation phase s": median(r["inference_s"] for r in ray),
        "peak memory of the Ray run, GiB": peak_ray / 2**30,
        "tagging, Ray Data / plain torch": median(t["ray_images_per_s"] / t["plain_torch_images_per_s"] for t in tagging)
        if tagging else None,
        "tagging, Ray Data / plain ONNX Runtime": median(t["ray_images_per_s"] / t["plain_onnx_images_per_s"]
                                                         for t in tagging) if tagging else None,
        "tagging, first batch s": median(t["ray_first_batch_s"] for t in tagging) if tagging else None,
        "test accuracy, Ray - plain": max(abs(r["accuracy"] - q["accuracy"]) for r, q in zip(ray, plain)),
    }
    print(f"\n{'target':36}  {'figure':>8}  {'bound':>8}  result")
    for name, (op, bound) in TARGETS.items():
        value = figures[name]
        if value is None:
            print(f"{name:36}  {'-':>8}  {op + ' ' + str(bound):>8}  not measured")
            continue
        met = {"<=": value <= bound, ">=": value >= bound, "<": value < bound, "==": value == bound}[op]
        print(f"{name:36}  {value:8.3f}  {op + ' ' + str(bound):>8}  {'met' if met else 'SHORT'}")


if __name__ == "__main__":
    main()
