"""What the command-line jobs share: argparse value types and how a failure becomes an exit code."""

from __future__ import annotations

import argparse
import sys

from clf.config import ClfError, ConfigError


def whole_number(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int, non_negative_int = whole_number(1), whole_number(0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_config(parser: argparse.ArgumentParser, config_class, argv=None):
    """The config the parsed flags make; a value the config refuses is a usage error (exit 2)."""
    args = parser.parse_args(argv)
    try:
        return config_class(**vars(args))
    except ConfigError as e:
        parser.error(str(e))


def run_job(prog: str, job) -> tuple[int, object]:
    """Call `job()`; a ClfError becomes one line on stderr and an exit code (2 for a usage error, 1 for a
    failed run), Ctrl-C exit code 130. Returns (exit code, the job's result or None)."""
    try:
        return 0, job()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None
    except ClfError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no outputs were written", file=sys.stderr)
        return 130, None
