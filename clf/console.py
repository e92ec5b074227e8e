"""What a person sees while a job runs: our own lines, and progress on every phase that takes a while.

`Progress` is a live tqdm line on a terminal (count, rate, time left); where the output is not a terminal
(`ray job submit`'s log, CI) it is the same figures as a plain line every PROGRESS_EVERY_S seconds that the
phase lasts, never a line per batch; either way the phase's own line (read N photos, an epoch's loss, the
tagging summary) says where it ended. Ray's own console lines are off (`clf.session`'s quiet); `--ray-logs`
keeps them. Ray writes all of it to its log files either way (/tmp/ray/session_latest/logs).
"""

from __future__ import annotations

import os
import sys
import time

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
        line = tqdm.format_meter(self.done, self.total, time.perf_counter() - self.started, prefix=self.what,
                                 unit=self.unit, bar_format=LINE)
        return " ".join(line.split())  # tqdm pads a rate under 10/s to 5 characters: ", 8.73 images/s" not ",  8.73"


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
