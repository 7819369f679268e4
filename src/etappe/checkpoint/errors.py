"""The checkpoint package's own errors and warning."""

from etappe.errors import EtappeError


class CheckpointError(EtappeError):
    """A checkpoint that cannot be saved, read or trusted; the message names the file and what was wrong."""


class NewerFormatError(CheckpointError):
    """A valid checkpoint in a format newer than this etappe reads. Never skipped as corrupt (that would let a
    run fall back, retrain and overwrite it): every reader of a store raises it, and saving over it is refused."""


class CheckpointWarning(UserWarning):
    """A bad checkpoint was skipped (by ``latest()``, ``best()`` or ``load()`` of a store)."""
