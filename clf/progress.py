"""Training's progress on the console: rank 0 posts it on the run's noticeboard (`ProgressPost`), the driver shows
it (`ProgressDisplay`, a thread while fit() runs). Ray's forwarding of worker output is off by default, and would
prefix each line with the worker's name: the driver prints every line itself.
"""

from __future__ import annotations

import threading
import time

from clf import console
from clf.noticeboard import Noticeboard


class ProgressPost:
    """Rank 0's side: how far the epoch under way is (posted at most every `every_s`), each epoch's record once
    reported, notes for the console, and when the last step was taken and the last report returned."""

    def __init__(self, key: str, every_s: float = 0.5):
        self.board, self.every_s, self.last = Noticeboard(key), every_s, 0.0
        self.state = {"step": [0, 0, 0], "records": [], "notes": [], "last_step": None, "reported": None}

    def step(self, epoch: int, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.state["step"] = [epoch, done, total]
            self.board.post(self.state)

    def note(self, line: str) -> None:
        self.state["notes"].append(line)
        self.board.post(self.state)

    def epoch_done(self, record: dict, last_step: float, reported: float) -> None:
        self.state["records"].append(record)
        self.state["last_step"], self.state["reported"] = last_step, reported
        self.board.post(self.state)


class ProgressDisplay:
    """The driver's side, a thread from `start()` to `stop()`: a progress line for the epoch under way, one line for
    each epoch done (handed to `on_epoch` too) and for each note. `state` is the board as it was last read."""

    def __init__(self, key: str, epochs: int, num_train: int, unit: str, on_epoch=None):
        self.board, self.epochs, self.num_train, self.unit, self.on_epoch = Noticeboard(key), epochs, num_train, unit, on_epoch
        self.state: dict = {}
        self.records_shown = self.notes_shown = 0
        self.bar: console.Progress | None = None
        self.bar_epoch = -1  # the 0-based epoch the bar is of
        self.finished = 0  # epochs whose records were shown
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def stop(self) -> None:
        """The last records and notes shown, the bar closed, the board removed."""
        self._stopping.set()
        self._thread.join()
        self.board.remove()

    @property
    def trained(self) -> bool:
        """Whether rank 0 took a step (its workers were placed and trained)."""
        return bool(self.state.get("step", [0, 0, 0])[2])

    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(0.5)  # once set: the last records, then done
            try:
                self.state.update(self.board.read() or {})
            except Exception:  # noqa: BLE001 - progress is not worth a failure (the GCS is reached at the next read)
                continue
            self._show_new()
            if stopping:
                break
            self._show_bar()
        self._close_bar()

    def _show_new(self) -> None:
        notes = self.state.get("notes", [])[self.notes_shown:]
        records = self.state.get("records", [])[self.records_shown:]
        self.notes_shown += len(notes)
        self.records_shown += len(records)
        for line in notes:
            (self.bar.write if self.bar is not None else _print)(line)
        for record in records:
            if record["epoch"] == self.bar_epoch + 1:
                self._close_bar()
            self.finished = max(self.finished, record["epoch"])
            _print(epoch_line(record, self.epochs, self.unit))
            if self.on_epoch is not None:
                self.on_epoch(record)

    def _show_bar(self) -> None:
        epoch, steps, total = self.state.get("step", (0, 0, 0))
        if not total or epoch + 1 <= self.finished:  # no step yet, or the epoch is done
            return
        if self.bar_epoch != epoch:
            self._close_bar()
            self.bar, self.bar_epoch = console.Progress(f"epoch {epoch + 1}/{self.epochs}", self.num_train, self.unit), epoch
        self.bar.update(min(self.num_train, self.num_train * steps // total) - self.bar.done)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def epoch_line(record: dict, epochs: int, unit: str = "images") -> str:
    held_out = f", validation accuracy {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
    return (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, train accuracy {record['accuracy']:.4f}"
            f"{held_out}, {record['images_per_s']:,.0f} {unit}/s, {record['elapsed_s']:.1f} s")


def _print(line: str) -> None:
    print(line, flush=True)
