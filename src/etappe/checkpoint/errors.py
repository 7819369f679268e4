"""The checkpoint package's own error and warning."""

from etappe.errors import EtappeError


class CheckpointError(EtappeError):
    """A checkpoint that cannot be saved, read or trusted; the message names the file and what was wrong."""


class CheckpointWarning(UserWarning):
    """A bad checkpoint was skipped (by ``latest()``, ``best()`` or ``load()`` of a store)."""
