"""The exceptions etappe raises for expected failures.

The CLI prints them as one line, without a traceback; library users catch them
like any other exception.
"""

import re


class EtappeError(Exception):
    """An expected failure, reported to the user in one line. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def _render_traceback_(self) -> list[str]:
        """What IPython shows for it in a notebook: the message, not a traceback (the failure is an expected one)."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class UsageError(EtappeError):
    """Bad input from the user: an unknown name, a shape that does not fit, a bad flag value."""

    exit_code = 2


class DataError(EtappeError):
    """A data set that is missing, malformed or does not fit the model."""


class TrainingError(EtappeError):
    """Training cannot go on (a non-finite loss, a failed save)."""


def check_flag(name: str, value: object, hint: str = "") -> bool:
    """``value``, if it is True or False; any other value is a UsageError (``hint`` added to its line). A yes-or-no
    option that lets code run (``trusted``) must not take a string such as "False", or 1, for a yes."""
    if not isinstance(value, bool):
        raise UsageError(f"{name}: expected True or False, got a {type(value).__name__}{hint}")
    return value


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes, which some libraries put in their messages."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name when it has none), without colour
    codes: what a one-line error quotes of a library's multi-line one."""
    lines = [line.strip() for line in strip_ansi(str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
