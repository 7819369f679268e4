"""etappe: train, evaluate, checkpoint, resume and export PyTorch models.

    import etappe
    etappe.save("ckpt", model=net, optimizer=opt, epoch=5, loss=0.4)
    values = etappe.load("ckpt", model=net, optimizer=opt)   # {'epoch': 5, 'loss': 0.4}
    history = etappe.fit(net, train_data, epochs=3, optimizer=opt, loss_fn=loss_fn, val_data=test_data)

Names are imported on first use, so ``import etappe`` and the CLI start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "fit": "etappe.loop",
    "evaluate": "etappe.loop",
    "Trainer": "etappe.loop",
    "Preempted": "etappe.loop",
    "save": "etappe.checkpoint",
    "load": "etappe.checkpoint",
    "verify": "etappe.checkpoint",
    "inspect": "etappe.checkpoint",
    "diff": "etappe.comparison",
    "CheckpointStore": "etappe.checkpoint",
    "CheckpointError": "etappe.checkpoint",
    "load_dataset": "etappe.data",
    "TensorData": "etappe.data",
    "ResumableLoader": "etappe.data.sampler",
    "RandomState": "etappe.state",
    "TrainConfig": "etappe.config",
    "LoopOptions": "etappe.config",
    "SaveOptions": "etappe.config",
    "ShowOptions": "etappe.config",
    "EtappeError": "etappe.errors",
    "UsageError": "etappe.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'etappe' has no attribute {name!r}")
