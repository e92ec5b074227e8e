"""The error family, and how an error becomes one line for a person.

A `ClfError` is a failure we expect and can explain (bad data, a setting that cannot work, a cluster that
cannot run the job): its message is printed as one line, without a traceback. Anything else is our own
bug and shows its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ClfError(Exception):
    """An error meant for a person: its message is printed as one line, exit code 1."""


class ConfigError(ClfError):
    """A setting that cannot work: a usage error, exit code 2."""


class SettingError(ConfigError):
    """One setting's value is out of its range; `setting` names the field, `problem` says what is wrong."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


class DataError(ClfError):
    """The data is missing or unreadable."""


class CheckpointError(ClfError):
    """A checkpoint that is missing, incomplete, of another shape, or unsafe to load."""


class Interrupted(ClfError):
    """Ctrl-C where the job can say what it leaves (during training: the checkpoint kept and how to resume);
    its message is printed as one line, exit code 130."""


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line, for an error that must fit on one."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def run_job(prog: str, job: Callable[[], T]) -> tuple[int, T | None]:
    """Call `job()`; a ClfError becomes one line on stderr and an exit code (2 for a usage error, 1 for a
    failed run), Ctrl-C exit code 130. Any other exception is a bug and propagates with its traceback.
    Returns (exit code, the job's result or None)."""
    try:
        return 0, job()
    except Interrupted as e:
        print(f"{prog}: {first_line(e)}", file=sys.stderr)
        return 130, None
    except ClfError as e:
        print(f"{prog}: error: {first_line(e)}", file=sys.stderr)
        return (2 if isinstance(e, ConfigError) else 1), None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no outputs were written", file=sys.stderr)
        return 130, None
