"""Settings read once from flags and prefixed environment variables.

Each program declares its options as a list of `Option`s; `Options` adds
them to an argparse parser (help shows the default and the variable) and
resolves them: a flag wins over its variable, which wins over the default.
Every value is parsed here, and a bad one raises `ConfigError` whose message
starts with the flag or variable it came from, so a typo stops the program
at start with one line instead of a traceback later.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting has a bad value; the message starts with the flag or variable name."""


@dataclass(frozen=True)
class Option:
    name: str  # the attribute: lease_seconds -> --lease-seconds, PREFIX_LEASE_SECONDS
    parse: Callable[[str], Any]
    default: Any
    help: str
    switch: bool = False  # a flag without a value: given means true
    several: bool = False  # the flag takes several values (joined by commas)
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class Options:
    def __init__(self, prefix: str, options: Sequence[Option]) -> None:
        self.prefix = prefix
        self.options = {o.name: o for o in options}

    def env_name(self, name: str) -> str:
        return self.prefix + name.upper()

    def describe(self, name: str) -> str:
        """`--flag/PREFIX_FLAG`, for messages about a setting however it was given."""
        return f"{self.options[name].flag}/{self.env_name(name)}"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for o in self.options.values():
            default = "off" if o.switch and not o.default else o.default
            shown = "" if default in ("", None, ()) else f"default {default}; "
            text = f"{o.help} ({shown}{self.env_name(o.name)})".replace("%", "%%")
            if o.switch:
                parser.add_argument(o.flag, action="store_const", const="true", help=text)
            else:
                parser.add_argument(
                    o.flag, nargs="+" if o.several else None, metavar=o.metavar, help=text
                )

    def resolve(
        self, args: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        env = os.environ if environ is None else environ
        out: dict[str, Any] = {}
        for name, o in self.options.items():
            value = given.get(name)
            if value is not None:
                source = o.flag
                text = ",".join(value) if isinstance(value, list) else str(value)
            elif self.env_name(name) in env:
                source, text = self.env_name(name), env[self.env_name(name)]
            else:
                out[name] = o.default
                continue
            try:
                out[name] = o.parse(text)
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc} (got {text!r})") from None
        return out


# -- parsers: each raises ValueError with what was expected ---------------------------


def text(value: str) -> str:
    return value


def non_empty(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def optional_text(value: str) -> str | None:
    return value or None


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if number < low or (high is not None and number > high):
            raise ValueError(
                f"must be between {low} and {high}" if high is not None else f"must be >= {low}"
            )
        return number

    return parse


def _float(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return number


def positive_float(value: str) -> float:
    number = _float(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def non_negative_float(value: str) -> float:
    number = _float(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def choice(*allowed: str) -> Callable[[str], str]:
    """Case-insensitive; returns the allowed spelling (upper case stays upper)."""

    def parse(value: str) -> str:
        for a in allowed:
            if value.strip().lower() == a.lower():
                return a
        raise ValueError(f"expected one of {', '.join(allowed)}")

    return parse


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_options() -> list[Option]:
    """The logging options every program has."""
    return [
        Option("log_level", choice(*LOG_LEVELS), "INFO", "DEBUG, INFO, WARNING or ERROR"),
        Option("log_json", boolean, False, "JSON log lines instead of logfmt", switch=True),
    ]
