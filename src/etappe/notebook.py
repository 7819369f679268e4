"""What a run shows in a Jupyter notebook: its progress bar and its curves, updated in place.

Nothing here imports IPython unless it is already loaded: a run outside a notebook never pays for it, and a
notebook's kernel has always loaded it.
"""

from __future__ import annotations

import html
import sys
import time
from typing import Any


_EMPTY = {"text/plain": "", "text/html": ""}  # an output that shows nothing (yet), in any front end


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab): IPython is loaded and its
    shell has a kernel. Terminal IPython and plain Python are not notebooks."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:  # an IPython half imported or torn down: not a notebook we can display in
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_bar(total: int, initial: int, desc: str) -> Any:
    """tqdm's widget bar when ipywidgets is installed, else an HTML bar updated in place (never a stream of
    carriage returns). Either takes ``update``, ``set_postfix_str`` and ``close``; it is gone once closed after
    a full epoch, and stays, as far as it got, when the epoch was cut short."""
    try:
        from tqdm.notebook import IProgress, tqdm
    except ImportError:
        IProgress = None
    if IProgress is not None:
        return tqdm(total=total, initial=initial, desc=desc, leave=False, unit="batch", mininterval=0.2)
    return HtmlBar(total, initial, desc)


class HtmlBar:
    """A progress bar as an HTML ``<progress>`` element and tqdm's text, shown once and updated through its
    display id at most every ``mininterval`` seconds."""

    def __init__(self, total: int, initial: int, desc: str, mininterval: float = 0.2) -> None:
        from IPython.display import HTML, display

        self.total, self.n, self.desc, self.postfix, self.mininterval = total, initial, desc, "", mininterval
        self.start = self.shown_at = time.monotonic()
        self.initial = initial
        self._html = HTML
        self.handle = display(HTML(self._render()), display_id=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.shown_at >= self.mininterval:
            self.shown_at = now
            self.handle.update(self._html(self._render()))

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text
        if refresh:
            self.handle.update(self._html(self._render()))

    def close(self) -> None:
        if self.handle is None:
            return
        if self.n >= self.total:
            self.handle.update(_EMPTY, raw=True)
        else:
            self.handle.update(self._html(self._render()))
        self.handle = None

    def _render(self) -> str:
        from tqdm import tqdm

        elapsed = time.monotonic() - self.start
        text = tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit="batch",
                                 postfix=self.postfix or None, bar_format="{l_bar}{r_bar}",
                                 initial=self.initial)
        left, _, right = text.partition("|")
        return (f'<div style="font-family:monospace">{html.escape(left)} '
                f'<progress value="{self.n}" max="{self.total}" style="width:40%;vertical-align:middle"></progress> '
                f"{html.escape(right.lstrip('| ').rstrip())}</div>")


class LiveCurves:
    """One figure of a run's curves in the notebook, shown when ``fit`` starts (empty until there is an epoch)
    and redrawn in place, through its display id, as epochs end: a 50-epoch run shows one figure, not fifty.
    Redraws come at most every ``min_interval`` seconds; ``close`` draws the last epoch in any case."""

    def __init__(self, history: Any, min_interval: float = 1.0) -> None:
        from IPython.display import display

        self.min_interval, self.drawn, self.drawn_at = min_interval, -1, 0.0
        self.handle = display(_EMPTY, raw=True, display_id=True)
        if len(history):
            self.update(history, force=True)

    def update(self, history: Any, force: bool = False) -> None:
        now = time.monotonic()
        if len(history) == self.drawn or (not force and now - self.drawn_at < self.min_interval):
            return
        from IPython.display import Image

        from etappe.plots import render

        self.handle.update(Image(data=render(history.epochs, "png", history.resumed), format="png"))
        self.drawn, self.drawn_at = len(history), now

    def close(self, history: Any) -> None:
        if len(history):
            self.update(history, force=True)
