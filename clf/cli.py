"""The command line, made from a config dataclass: one flag per field, its help and default from the field,
its validation the config's own."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from clf.errors import ConfigError, SettingError, run_job


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


# Parsing only: whether a value is in range is the config's to say.
PARSERS = {int: _whole_number, float: _number, str: str}
METAVARS = {int: "N", float: "X"}


def _value_type(annotation) -> type:
    """int for `int` and `int | None`, and so on; tuple for `tuple[str, ...]` (a flag given once or more)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) or annotation


def parser_for(config_class, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind, help_text = _value_type(hints[f.name]), f.metadata["help"]
        if kind is bool:
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            parser.add_argument(flag(f.name), action=action, default=f.default, help=help_text)
            continue
        if kind is tuple:  # a flag given once or more: its values in order
            parser.add_argument(flag(f.name), action="append", default=f.default, metavar=f.name.upper(), help=help_text)
            continue
        required = f.default is dataclasses.MISSING
        if not required and f.default is not None:
            help_text += f" (default: {f.default})"
        parser.add_argument(
            flag(f.name), type=PARSERS[kind], required=required, default=None if required else f.default,
            choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else METAVARS.get(kind, f.name.upper()), help=help_text,
        )
    return parser


def parse(config_class, description: str, argv=None):
    """The config the command line makes; a value the config refuses is a usage error (exit 2)."""
    parser = parser_for(config_class, description)
    args = parser.parse_args(argv)
    try:
        return config_class(**vars(args))
    except SettingError as e:
        parser.error(f"argument {flag(e.setting)}: {e.problem}")
    except ConfigError as e:
        parser.error(str(e))


def main(prog: str, config_class, description: str, job, argv=None) -> int:
    """A job's whole command line: the config from the flags, `job(config)` run, the line it returns printed;
    the exit code (see `clf.errors.run_job`)."""
    cfg = parse(config_class, description, argv)
    code, last_line = run_job(prog, lambda: job(cfg))
    if last_line:
        print(last_line)
    return code


def exit_now(code: int) -> None:
    """End a job's process with `code`: a job that got as far as Ray ends the quick way
    (`clf.session.exit_now`), one that stopped before (--help, a usage error) the usual way."""
    if "clf.session" in sys.modules:
        sys.modules["clf.session"].exit_now(code)
    sys.exit(code)
