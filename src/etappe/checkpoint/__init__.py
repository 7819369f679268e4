"""Crash-safe checkpoints: atomic folders of safetensors + JSON with a checksummed manifest, a store with
retention, safe reading of plain torch.save files, and inspection.

    save(path, **objects)                 load(path, *, trusted=False, **objects)      verify(path)
    CheckpointStore(root, keep_last=..., keep_best=..., monitor=..., mode=..., keep_every=..., async_save=False)
        .save(step, objects, metrics)  .latest()  .best()  .load()  .checkpoints()  .lock()  .wait()  .close()
    inspect(path) / format_inspection(info)      verify_tree(path)
    open_store(root, ...)                 a CheckpointStore, or an ObjectCheckpointStore for s3:// (objectstore.py)
"""

from etappe.checkpoint.errors import CheckpointError, CheckpointWarning, NewerFormatError
from etappe.checkpoint.folder import load, save, verify
from etappe.checkpoint.inspection import format_inspection, inspect
from etappe.checkpoint.manifest import CHECKSUM, checksum
from etappe.checkpoint.objectstore import ObjectCheckpointStore, open_store
from etappe.checkpoint.store import Checkpoint, CheckpointStore, verify_tree

__all__ = [
    "CHECKSUM",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "CheckpointWarning",
    "NewerFormatError",
    "ObjectCheckpointStore",
    "checksum",
    "format_inspection",
    "inspect",
    "load",
    "open_store",
    "save",
    "verify",
    "verify_tree",
]
