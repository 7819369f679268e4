"""The loss and accuracy curves of a run: ``curves.png``, ``etappe plot``, and the figure a notebook updates.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot: drawing changes no backend and
registers no figure, so a notebook's own plotting (its inline backend) is left as it was.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from etappe.checkpoint.fsio import atomic_write_bytes
from etappe.errors import UsageError

LOG_SCALE_DECADES = 2  # a loss spanning more than this many decades is drawn on a log axis


def log_scale(values: Iterable[Any]) -> bool:
    """Whether losses are drawn on a log axis: they are all positive and the largest is more than 10**2 times
    the smallest (a sine fit falling from 0.5 to 1e-4 would otherwise sit flat on zero after two epochs)."""
    finite = [float(v) for v in values if _number(v) and math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > 10 ** LOG_SCALE_DECADES


def figure(rows: Sequence[dict], resumed: Sequence[float] = ()) -> Any:
    """A matplotlib Figure of ``rows`` (a history's epochs): every train_* and val_* loss on one axis and, when
    recorded, the accuracies on a second; ``resumed`` (positions in epochs done) drawn as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = _columns(rows)
    losses = [k for k in keys if k.startswith(("train_", "val_")) and "acc" not in k]
    accuracies = [k for k in keys if "acc" in k]
    fig = Figure(figsize=(10 if accuracies else 5.5, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if accuracies else 1, squeeze=False)[0]
    epochs = [r["epoch"] for r in rows]
    ax = axes[0]
    for key in losses:
        ax.plot(epochs, [_value(r.get(key)) for r in rows], marker="o", markersize=3, label=_label(key))
    if log_scale(r.get(k) for r in rows for k in losses):
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    if accuracies:
        ax = axes[1]
        for key in accuracies:
            ax.plot(epochs, [_percent(r.get(key)) for r in rows], marker="o", markersize=3, color="tab:green",
                    label=_label(key))
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy")
    last = max(epochs, default=1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5 if last > 1 else 0, last + 0.5)
        for i, x in enumerate(resumed):
            ax.axvline(x, color="grey", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def formats() -> list[str]:
    """The image formats matplotlib writes (png, svg, pdf, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())


def render(rows: Sequence[dict], kind: str = "png", resumed: Sequence[float] = ()) -> bytes:
    """The figure of ``rows`` as an image file's bytes (png, svg, pdf ...)."""
    if kind not in formats():
        raise UsageError(f"cannot draw a {kind!r} image: matplotlib does not write it; use one of: {', '.join(formats())}")
    image = io.BytesIO()
    figure(rows, resumed).savefig(image, format=kind, dpi=100)
    return image.getvalue()


def plot_history(rows: list[dict], out: Path, resumed: Sequence[float] = ()) -> Path:
    """Draw ``rows`` into the image file ``out`` (its suffix names the format), written atomically."""
    kind = out.suffix.lstrip(".").lower() or "png"
    if kind not in formats():
        raise UsageError(f"cannot draw {out}: {out.suffix!r} is not an image format matplotlib writes; "
                         f"use one of: {', '.join('.' + k for k in formats())}")
    image = render(rows, kind, resumed)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, image)  # a failed write keeps the previous figure
    return out


def _columns(rows: Sequence[dict]) -> list[str]:
    out: list[str] = []
    for row in rows:
        out += [k for k, v in row.items() if k not in out and _number(v)]
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(value: Any) -> float:
    return float(value) if _number(value) else math.nan  # a gap in the line where an epoch lacks the metric


def _percent(value: Any) -> float:
    return 100 * float(value) if _number(value) else math.nan


def _label(key: str) -> str:
    """``val_loss`` -> ``validation loss``, ``train_loss_D`` -> ``train loss_D``."""
    split, rest = key.split("_", 1)
    return f"{'validation' if split == 'val' else split} {rest}"
