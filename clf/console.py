"""What a person sees while a job runs: our own lines, and progress on every phase that takes a while.

`Progress` is a live tqdm line on a terminal (count, rate, time left); where the output is not a terminal
(`ray job submit`'s log, CI) it is the same figures as a plain line every PROGRESS_EVERY_S seconds that the
phase lasts, never a line per batch; either way the phase's own line (read N photos, an epoch's loss, the
tagging summary) says where it ended. `quiet_ray` turns Ray's own console lines off (its start, Ray Data's
execution lines and warnings, what Ray's worker processes print); `--ray-logs` keeps them. Ray still writes
all of it to its log files (/tmp/ray/session_latest/logs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from tqdm import tqdm

# Seconds between two progress lines where the output is not a terminal.
PROGRESS_EVERY_S = float(os.environ.get("CLF_PROGRESS_EVERY_S", "10"))
# Such a line: "reading photos: 1,200/2,000 photos (60%), 480 photos/s, 00:01 left".
# (`unit` starts with a space: tqdm writes the rate as "480.12" + unit + "/s".)
LINE = "{desc}: {n:,}/{total:,}{unit} ({percentage:.0f}%), {rate_noinv_fmt}, {remaining} left"
LIVE = "{desc}: {percentage:3.0f}%|{bar}| {n:,}/{total:,}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}]"


def live() -> bool:
    """Whether stdout is a terminal a line can be redrawn on."""
    return sys.stdout.isatty()


class Progress:
    """The progress of one phase of `total` `unit`s (photos, images, files), started as it is made; `update`
    with each piece done, `close` (or leave the `with` block) at the end. On a terminal the bar is erased
    at the end: the phase's own summary line follows."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, max(int(total), 0), f" {unit}"
        self.done, self.started = 0, time.perf_counter()
        self.last_line = self.started
        self.bar = tqdm(total=self.total, desc=what, unit=self.unit, file=sys.stdout, leave=False, mininterval=0.5,
                        bar_format=LIVE, dynamic_ncols=True) if live() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last_line >= PROGRESS_EVERY_S and self.done < self.total:
            self.last_line = time.perf_counter()
            print(self.line(), flush=True)

    def line(self) -> str:
        return tqdm.format_meter(self.done, self.total, time.perf_counter() - self.started, prefix=self.what,
                                 unit=self.unit, bar_format=LINE)

    def write(self, text: str) -> None:
        """A line of ours while the bar is up (above it, on a terminal)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_ray(ray_logs: bool) -> dict:
    """Before Ray starts: Ray's console lines off unless `ray_logs`. Returns the arguments for `ray.init`:
    its Python loggers at ERROR (its start, and notices such as the one about token authentication), and
    worker processes' output kept in their log files (the driver prints every line of ours itself)."""
    if ray_logs:
        return {}
    # Deprecation notices and the like that Ray's own code raises, in Ray's modules.
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    return {"logging_level": logging.ERROR, "log_to_driver": False}


def native_stderr_to(path: str) -> None:
    """Send what native code writes to this process's stderr to the file `path`; Python's `sys.stderr`
    (our error lines, tracebacks, warnings) stays on the console. The native writer is Ray's C++ core: it
    logs an error-level line each time Ray Data starts a pool actor, as Ray Data hands every pool actor its
    context and function through the object store while letting Ray restart it (Ray issue 53727); the
    restarts are what let a job survive an actor's death, so the line stays and goes to the file."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(console, "w", buffering=1, errors="backslashreplace")


def quiet_ray_data(ray_logs: bool) -> None:
    """Once Ray Data is imported: its console lines (a dataset's start, plan, end, and a warning that its
    progress bars are off, for every dataset) off, its log file (ray-data.log) as it is. Ray Data's own
    bars stay off: ours count what the job counts."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray_logs:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console's; the file's is a Handler of its own
            handler.setLevel(logging.ERROR)
