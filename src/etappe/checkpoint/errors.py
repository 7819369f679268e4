"""The checkpoint package's own errors and warning."""

from etappe.errors import EtappeError


class CheckpointError(EtappeError):
    """A checkpoint that cannot be saved, read or trusted; the message names the file and what was wrong."""


class NewerFormatError(CheckpointError):
    """A checkpoint whose manifest names a format version this etappe does not read (a higher one, or one that is
    not a whole number: a newer etappe may record it otherwise), whatever its checksum says. Never skipped as
    corrupt (that would let a run fall back, retrain and overwrite it): every reader of a store raises it, and saving
    over it is refused."""


class CheckpointWarning(UserWarning):
    """A bad checkpoint was skipped (by ``latest()``, ``best()`` or ``load()`` of a store)."""


class TrustError(CheckpointError):
    """A file that runs code when opened (a pickle needing full unpickling, TorchScript, a .pt2 program), refused
    because the user did not pass ``--trust`` / ``trusted=True``. Exits 2 like other bad input."""

    exit_code = 2
