"""What resumes speaks one protocol: ``state_dict()`` / ``load_state_dict()``.

Here live the small stateful pieces the loop owns (its counters, the metric
history, the random generators) and ``unwrap`` for wrapped modules.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator

import numpy as np
import torch
from torch import nn

from etappe.errors import UsageError


@dataclass
class Progress:
    """Where a run is. ``step`` counts optimizer steps over the whole run; the epoch sums hold the
    running totals of the epoch in progress so a mid-epoch resume reports the same epoch loss."""

    epoch: int = 0
    step: int = 0
    batches_done_in_epoch: int = 0
    samples_in_epoch: int = 0
    loss_sum_in_epoch: float = 0.0
    extra_sums_in_epoch: dict[str, float] = field(default_factory=dict)
    seconds_in_epoch: float = 0.0
    best_metric: float | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False  # the monitored metric stopped improving: patience ended the run
    skipped_steps: int = 0  # optimizer steps the fp16 gradient scaler skipped (non-finite gradients), in all

    def add_batch(self, samples: int, losses: dict[str, float], batches: int = 1) -> None:
        """Count one optimizer step over ``batches`` (micro-)batches of ``samples`` samples in all, and add its
        losses to the epoch's sums."""
        self.step += 1
        self.batches_done_in_epoch += batches
        self.samples_in_epoch += samples
        for k, v in losses.items():
            if k == "loss":
                self.loss_sum_in_epoch += v * samples
            else:
                self.extra_sums_in_epoch[k] = self.extra_sums_in_epoch.get(k, 0.0) + v * samples

    def start_epoch(self) -> None:
        self.batches_done_in_epoch = self.samples_in_epoch = 0
        self.loss_sum_in_epoch = self.seconds_in_epoch = 0.0
        self.extra_sums_in_epoch = {}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        state = {"stopped_early": state.get("finished", False), **state}  # its name before etappe 0.2
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class History:
    """The metric history of a run: one plain dict per finished epoch (epoch, step, train_loss, val_loss,
    val_accuracy, lr, seconds, samples_per_s, ...), and where the run was resumed.

    ``history[-1]`` is the last epoch's row, ``history.best("val_loss")`` the best one; in a notebook it shows
    as a table. ``resumed`` holds the positions, in epochs done (2.5: half-way through epoch 3), at which the
    run was resumed from a checkpoint; the curves mark them."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.resumed: list[float] = []

    def append(self, row: dict) -> None:
        self.epochs.append(row)

    def mark_resumed(self, position: float) -> None:
        self.resumed.append(float(position))

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i: int | slice) -> dict | list[dict]:
        # copies: changing them leaves the run's history (and its checkpoints) alone
        if isinstance(i, slice):
            return [dict(row) for row in self.epochs[i]]
        if not isinstance(i, int) or not -len(self.epochs) <= i < len(self.epochs):
            raise IndexError(f"history[{i!r}]: this history has {len(self.epochs)} epochs (rows 0 to "
                             f"{len(self.epochs) - 1}, or -1 for the last)")
        return dict(self.epochs[i])

    def __iter__(self) -> Iterator[dict]:
        return (dict(row) for row in self.epochs)

    @property
    def rows(self) -> list[dict]:
        """The epochs as a list of plain dicts (copies), e.g. for ``pandas.DataFrame(history.rows)``."""
        return [dict(row) for row in self.epochs]

    def best(self, metric: str = "val_loss", mode: str | None = None) -> dict:
        """The row of the epoch where ``metric`` was best: the lowest for ``mode="min"``, the highest for
        ``"max"``; by default the highest for a metric whose name holds "acc" (val_accuracy), else the lowest,
        as ``monitor`` judges. The first such epoch on a tie; epochs without the metric are passed over."""
        from etappe.config import monitor_mode

        if not isinstance(metric, str):
            raise UsageError(f"best(metric): expected a metric's name such as 'val_loss', got {metric!r}")
        mode = monitor_mode(metric) if mode is None else mode
        if mode not in ("min", "max"):
            raise UsageError(f"best(..., mode={mode!r}): expected 'min' or 'max'")
        scored = [row for row in self.epochs if _number(row.get(metric)) and not math.isnan(row[metric])]
        if not scored:
            known = sorted({k for row in self.epochs for k, v in row.items() if _number(v)})
            raise UsageError(f"no epoch of this history has {metric!r}" + (
                f"; its metrics are: {', '.join(known)}" if known else ": it holds no epochs yet"))
        pick = min if mode == "min" else max
        return dict(pick(scored, key=lambda row: row[metric]))

    def columns(self) -> list[str]:
        """Every key of the rows, in the order they first appear."""
        out: list[str] = []
        for row in self.epochs:
            out += [k for k in row if k not in out]
        return out

    def __repr__(self) -> str:
        if not self.epochs:
            return "History(no epochs yet)"
        columns = self.columns()
        rows = [[_shown(row.get(c), c) for c in columns] for row in _elided(self.epochs)]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        return f"History({len(self.epochs)} epochs{_resumed_note(self.resumed)})\n" + "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        columns = self.columns()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_shown(row.get(c), c))}</td>" for c in columns) + "</tr>"
                       for row in _elided(self.epochs))
        caption = f"History: {len(self.epochs)} epochs{_resumed_note(self.resumed)}"
        return (f"<table class=\"etappe-history\"><caption style=\"text-align:left\">{html.escape(caption)}</caption>"
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def state_dict(self) -> dict:
        state: dict = {"epochs": [dict(row) for row in self.epochs]}
        if self.resumed:  # only then: an uninterrupted run's checkpoints stay as they were
            state["resumed"] = list(self.resumed)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epochs = [dict(row) for row in state["epochs"]]
        self.resumed = [float(x) for x in state.get("resumed", [])]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object, column: str = "") -> str:
    """A value of a history row as a table shows it: losses and rates to 4 decimals (tiny ones in e-notation),
    seconds to 0.1, samples/s whole; nothing for a missing one."""
    if value is None:
        return ""
    if not isinstance(value, float):
        return str(value)
    if column == "seconds":
        return f"{value:.1f}"
    if column == "samples_per_s":
        return f"{value:,.0f}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) or column == "lr":
        return f"{value:.4g}"
    return f"{value:.4f}"


_SHOWN_ROWS = 20  # a longer history shows its first and last ten epochs


def _elided(rows: list[dict]) -> list[dict]:
    if len(rows) <= _SHOWN_ROWS:
        return rows
    half = _SHOWN_ROWS // 2
    return [*rows[:half], {"epoch": "..."}, *rows[-half:]]


def _resumed_note(resumed: list[float]) -> str:
    if not resumed:
        return ""
    return "; resumed after " + ", ".join(f"{x:.2f}" for x in resumed) + " epochs"  # epochs done, batches as a fraction


class RandomState:
    """Every random generator a run draws from: Python's, NumPy's global one, torch's CPU one, each CUDA device's
    (once CUDA is initialised), and the generators you pass: ``torch.Generator``, ``numpy.random.Generator`` or
    ``random.Random`` objects, restored in the order given. ``state_dict`` captures them at the moment it is
    called (``etappe.save(..., rng=RandomState())``); ``load_state_dict`` puts them back: load it after
    everything else, just before training goes on."""

    def __init__(self, *generators: "torch.Generator | np.random.Generator | random.Random") -> None:
        for g in generators:
            if not isinstance(g, (torch.Generator, np.random.Generator, random.Random)):
                raise UsageError(f"RandomState takes torch.Generator, numpy.random.Generator or random.Random "
                                 f"objects; got a {type(g).__name__}")
        self.generators = generators

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        state = {
            "python": {"version": version, "internal": list(internal), "gauss": gauss},
            "numpy": {
                "kind": np_state[0],
                "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if self.generators:
            state["generators"] = [_generator_state(g) for g in self.generators]
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("generators", [])
        if len(saved) != len(self.generators):
            raise UsageError(f"the saved random state holds {len(saved)} generator(s) of your own; this RandomState "
                             f"was given {len(self.generators)}: pass the same generators, in the same order")
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
        npd = state["numpy"]
        keys = np.asarray(npd["keys"].numpy() if torch.is_tensor(npd["keys"]) else npd["keys"]).astype(np.uint32)
        np.random.set_state((npd["kind"], keys, npd["pos"], npd["has_gauss"], npd["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
            torch.cuda.set_rng_state_all(cuda_states)
        for g, s in zip(self.generators, saved):
            _set_generator_state(g, s)


RNGState = RandomState  # its name inside etappe's loop


def _generator_state(g: "torch.Generator | np.random.Generator | random.Random") -> dict:
    if isinstance(g, torch.Generator):
        return {"kind": "torch", "device": str(g.device), "state": g.get_state()}
    if isinstance(g, np.random.Generator):
        return {"kind": "numpy", "state": g.bit_generator.state}  # PCG64's are 128-bit ints: JSON keeps them exact
    version, internal, gauss = g.getstate()
    return {"kind": "python", "version": version, "internal": list(internal), "gauss": gauss}


def _set_generator_state(g: "torch.Generator | np.random.Generator | random.Random", saved: dict) -> None:
    kind = {torch.Generator: "torch", np.random.Generator: "numpy"}.get(type(g), "python")
    if saved.get("kind") != kind:
        raise UsageError(f"the saved random state holds a {saved.get('kind')} generator where this RandomState has "
                         f"a {kind} one: pass the same generators, in the same order")
    if kind == "torch":
        g.set_state(saved["state"])
    elif kind == "numpy":
        g.bit_generator.state = saved["state"]
    else:
        g.setstate((saved["version"], tuple(saved["internal"]), saved["gauss"]))


class PerRank:
    """What differs between the ranks of a run: each one's random state and its running sums of the epoch in
    progress. The trainer gathers every rank's part (``capture``) just before rank 0 commits a checkpoint; on load
    each rank restores its own. A checkpoint from another number of ranks still resumes (rank 0 takes the summed
    epoch totals, every rank the random state of its own rank or of rank 0), but no longer bit-exact."""

    def __init__(self, progress: Progress, rank: int = 0, world_size: int = 1) -> None:
        self.progress, self.rank, self.world_size = progress, rank, world_size
        self.states: list[dict] = []
        self.world_size_changed = False

    def mine(self) -> dict:
        p = self.progress
        return {
            "rng": RNGState().state_dict(),
            "samples_in_epoch": p.samples_in_epoch,
            "loss_sum_in_epoch": p.loss_sum_in_epoch,
            "extra_sums_in_epoch": dict(p.extra_sums_in_epoch),
        }

    def capture(self, gathered: list[dict]) -> None:
        self.states = gathered

    def state_dict(self) -> dict:
        return {"ranks": self.states}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        self.world_size_changed = len(ranks) != self.world_size
        own = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        p = self.progress
        if not self.world_size_changed:
            p.samples_in_epoch, p.loss_sum_in_epoch = own["samples_in_epoch"], own["loss_sum_in_epoch"]
            p.extra_sums_in_epoch = dict(own["extra_sums_in_epoch"])
        elif self.rank == 0:
            p.samples_in_epoch = sum(r["samples_in_epoch"] for r in ranks)
            p.loss_sum_in_epoch = sum(r["loss_sum_in_epoch"] for r in ranks)
            p.extra_sums_in_epoch = {k: sum(r["extra_sums_in_epoch"].get(k, 0.0) for r in ranks)
                                     for k in ranks[0]["extra_sums_in_epoch"]}
        else:
            p.samples_in_epoch, p.loss_sum_in_epoch, p.extra_sums_in_epoch = 0, 0.0, {}
        RNGState().load_state_dict(own["rng"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)  # torch takes 64 bits (a negative seed means this too); a derived seed may be more


class EMA:
    """An exponential moving average of a model's weights: after every optimizer step each averaged parameter moves
    ``1 - decay`` of the way to the model's (``ema = decay * ema + (1 - decay) * w``) and the buffers are copied.
    ``module`` is the averaged model, a copy of the model kept in eval mode: saved, validated and exported as one."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for averaged, current in zip(self.module.parameters(), model.parameters()):
            averaged.lerp_(current.detach(), 1 - self.decay)
        for averaged, current in zip(self.module.buffers(), model.buffers()):
            averaged.copy_(current)


def derive_seed(seed: int, *parts: int) -> int:
    """A seed for one part of a run (an epoch's order, a batch's augmentation) from the run's seed and the part's
    numbers: the same parts give the same seed wherever the run was resumed and whichever worker asks."""
    for part in parts:
        seed = seed * 1_000_003 + part
    return seed


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then each submodule back in its own mode, whatever happens in the block
    (not one flag for all: a submodule frozen in eval mode stays so, which ``model.train(was)`` would undo)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers, so saved names carry
    no ``module.`` or ``_orig_mod.`` prefix."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
