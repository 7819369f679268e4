"""The seeds' figure: train and validation loss per epoch, and accuracy when there is one."""

from __future__ import annotations

import io
from pathlib import Path

from etappe.checkpoint.fsio import atomic_write_bytes
from etappe.errors import UsageError


def plot_history(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    has_acc = any("val_accuracy" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train loss")
    if any("val_loss" in r for r in rows):
        ax.plot(epochs, [r.get("val_loss") for r in rows], marker="o", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[0][1]
        ax.plot(epochs, [100 * r["val_accuracy"] if "val_accuracy" in r else None for r in rows], marker="o",
                color="tab:green", label="validation accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    kind = out.suffix.lstrip(".").lower() or "png"
    if kind not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise UsageError(f"cannot draw {out}: {out.suffix!r} is not an image format matplotlib writes; "
                         f"use one of: {', '.join('.' + k for k in sorted(fig.canvas.get_supported_filetypes()))}")
    image = io.BytesIO()
    fig.savefig(image, format=kind, dpi=100)
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, image.getvalue())  # a failed write keeps the previous figure
    return out
