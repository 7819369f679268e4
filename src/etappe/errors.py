"""The exceptions etappe raises for expected failures.

The CLI prints them as one line, without a traceback; library users catch them
like any other exception.
"""


class EtappeError(Exception):
    """An expected failure, reported to the user in one line. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(EtappeError):
    """Bad input from the user: an unknown name, a shape that does not fit, a bad flag value."""

    exit_code = 2


class DataError(EtappeError):
    """A data set that is missing, malformed or does not fit the model."""


class TrainingError(EtappeError):
    """Training cannot go on (a non-finite loss, a failed save)."""
