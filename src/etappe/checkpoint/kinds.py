"""What a saved thing is (module, optimizer, scheduler, scaler, other Stateful, plain value), told from the
object when saving and from the state_dict's shape when the object is gone (a plain torch.save file);
and putting a state back into an object: for a model, by the one rule for names (``renaming``: a wrapper's or
any other consistent prefix), tied weights (``tied.partners``) and ``strict``, wherever weights are loaded."""

import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from etappe.checkpoint import tied
from etappe.checkpoint.errors import CheckpointError, CheckpointWarning

MODULE, OPTIMIZER, SCHEDULER, SCALER, STATEFUL, VALUE = "module", "optimizer", "scheduler", "scaler", "stateful", "value"


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def of_object(obj: Any) -> str:
    if isinstance(obj, torch.nn.Module):
        return MODULE
    if isinstance(obj, torch.optim.Optimizer):
        return OPTIMIZER
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return SCHEDULER
    if isinstance(obj, torch.amp.GradScaler):
        return SCALER
    return STATEFUL if is_stateful(obj) else VALUE


def of_state(state: Any) -> str:
    """Guess the kind from a state_dict alone."""
    if is_stateful(state):
        return of_object(state)
    if not isinstance(state, Mapping) or not state:
        return VALUE
    if {"state", "param_groups"} <= state.keys():
        return OPTIMIZER
    if all(isinstance(k, str) for k in state) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return MODULE
    if "last_epoch" in state or "base_lrs" in state:
        return SCHEDULER
    if {"scale", "growth_factor"} <= state.keys():
        return SCALER
    return VALUE


def type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's OptimizedModule; DistributedDataParallel, DataParallel
_ORIGIN = {"_orig_mod.": " (torch.compile)", "module.": " (DistributedDataParallel or DataParallel)"}


@dataclass(frozen=True)
class Renaming:
    """How a file's tensor names become a model's: ``strip`` taken off the front of every name, or ``add`` put in
    front of each. Empty for names used as they are; ``rivals`` then lists the renamings that fitted equally well,
    when there were several and none was taken."""

    strip: str = ""
    add: str = ""
    rivals: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.strip or self.add)

    def __call__(self, name: str) -> str:
        return self.add + name[len(self.strip):]

    def __str__(self) -> str:
        if self.strip:
            return f"took {self.strip!r}{_ORIGIN.get(self.strip, '')} off every name"
        return f"put {self.add!r}{_ORIGIN.get(self.add, '')} in front of every name" if self.add else "no renaming"


def renaming(saved: Mapping[str, Any], model: Mapping[str, Any]) -> Renaming:
    """The one prefix rule: how the names of a saved state (``saved``: {name: shape or None}) map onto a model's
    (``model``: the same), for every load of weights into a model.

    Names that are all the model's are used as they are. Otherwise each candidate renaming is tried: taking off a
    dotted prefix that every saved name carries (a wrapper's ``module.``, ``_orig_mod.``, or any other), or putting
    in front of every saved name a dotted prefix the model's names have (the model is wrapped, or the file holds
    one of its submodules). A candidate is taken when it maps more than half of the saved names onto the model's
    and more than the names as they are do, and no other candidate maps as many (equal shapes break a tie of
    names); several equally good ones are never guessed between (``rivals``)."""
    keys = list(saved)
    if not keys or not all(isinstance(k, str) for k in keys) or all(k in model for k in keys):
        return Renaming()
    found: dict[tuple[str, str], list[int]] = {}  # (strip, add) -> [names that fit, of which shapes fit too]

    def fits(old: str, new: str, score: list[int]) -> None:
        if new in model:
            score[0] += 1
            score[1] += _same_shape(saved[old], model[new])

    parts = keys[0].split(".")
    for j in range(1, len(parts)):
        prefix = ".".join(parts[:j]) + "."
        if not all(k.startswith(prefix) and len(k) > len(prefix) for k in keys):
            break
        score = found.setdefault((prefix, ""), [0, 0])
        for k in keys:
            fits(k, k[len(prefix):], score)
    fronts: dict[str, set[str]] = {}  # a model name's tail -> the prefixes that stand before it
    for name in model:
        if isinstance(name, str):
            dots = [i for i, c in enumerate(name) if c == "."]
            for i in dots:
                if i + 1 < len(name):
                    fronts.setdefault(name[i + 1:], set()).add(name[: i + 1])
    for k in keys:
        for prefix in fronts.get(k, ()):
            fits(k, prefix + k, found.setdefault(("", prefix), [0, 0]))
    as_is = sum(k in model for k in keys)
    ranked = sorted(found.items(), key=lambda it: (-it[1][0], -it[1][1], it[0]))
    if not ranked or ranked[0][1][0] <= as_is or 2 * ranked[0][1][0] <= len(keys):
        return Renaming()
    best = [Renaming(*pair) for pair, score in ranked if score == ranked[0][1]]
    if len(best) > 1:
        return Renaming(rivals=tuple(str(r) for r in best))
    return best[0]


def _same_shape(a: Any, b: Any) -> bool:
    return a is not None and b is not None and tuple(a) == tuple(b)


def shape_of(value: Any) -> tuple[int, ...] | None:
    """A state value's shape (a tensor's, a TensorInfo's, a shape's itself); None for anything else."""
    shape = getattr(value, "shape", value)
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in shape):
        return tuple(shape)
    return None


def renamed(state: Mapping[str, Any], rename: Renaming) -> Mapping[str, Any]:
    """``state`` with every name renamed, torch's per-module ``_metadata`` too; ``state`` itself for no renaming."""
    if not rename:
        return state
    out = OrderedDict((rename(k), v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        stem = rename.strip[:-1]
        moved = OrderedDict()
        for k, v in metadata.items():  # module paths: "" (the root), "fc", "fc.sub"
            if rename.strip and (k == stem or k.startswith(rename.strip)):
                moved[k[len(rename.strip):] if k != stem else ""] = v
            elif rename.add:
                moved[rename.add + k if k else rename.add[:-1]] = v
        out._metadata = moved  # type: ignore[attr-defined]
    return out


def unprefixed(state: Mapping[str, Any], model_keys: Iterable[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    """A module state_dict with its names mapped onto a model's (``model_keys``: its names, or {name: tensor or
    shape}) by the one prefix rule (``renaming``): a state saved from a compiled or DDP-wrapped model
    (``_orig_mod.*``, ``module.*``) loses the wrapper's prefix; a state whose names already fit, or that no
    renaming fits, comes back as it is (the same object)."""
    if isinstance(model_keys, Mapping):
        model = {k: shape_of(v) for k, v in model_keys.items()}
    else:
        model = dict.fromkeys(model_keys)
    if not isinstance(state, Mapping):
        return state
    return renamed(state, renaming({k: shape_of(v) for k, v in state.items()}, model))


@dataclass(frozen=True)
class LoadReport:
    """What a load of weights into a model did. ``missing``: the model's names the file did not fill;
    ``unexpected``: the file's names (as stored) the model has no place for; ``mismatched``: (model name, shape in
    the file, shape in the model) for names in both that differ in shape; ``renamed``: what the prefix rule did
    (``Renaming``); ``tied``: (name, the name it was filled from) for a model's tied weight the file stored once
    (as ``safetensors.torch.save_model`` writes). Non-strict loads load the rest; strict ones only when all three
    lists are empty. ``summary``: the three lists, grouped and short."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    renamed: Renaming = field(default_factory=Renaming)
    tied: tuple[tuple[str, str], ...] = ()
    summary: str = ""

    @property
    def complete(self) -> bool:
        """Every name of the model filled, every tensor of the file used, no shape differing."""
        return not (self.missing or self.unexpected or self.mismatched)


class Loaded(dict):
    """``load()``'s result: the entries not restored, {name: value}, as a plain dict; ``reports`` maps each model
    restored to its ``LoadReport`` (missing, unexpected and mismatched names; prefix taken off; tied weights)."""

    def __init__(self, values: Mapping[str, Any] = (), reports: Mapping[str, LoadReport] | None = None) -> None:
        super().__init__(values)
        self.reports: dict[str, LoadReport] = dict(reports or {})


@dataclass(frozen=True)
class _Plan:
    names: dict[str, str]  # saved name -> model name, for every saved tensor that is loaded
    ties: dict[str, str]  # model name left out by the file -> the model name whose memory it shares
    report: LoadReport


def _plan(saved: Mapping[str, Any], model_state: Mapping[str, Any]) -> _Plan:
    """What loading tensors of these names and shapes (``saved``) into a model with ``model_state`` does."""
    model = {k: shape_of(v) for k, v in model_state.items()}
    rename = renaming(saved, model)
    names, unexpected, mismatched = {}, [], []
    for old, shape in saved.items():
        new = rename(old)
        if new not in model:
            unexpected.append(old)
        elif shape is not None and model[new] is not None and tuple(shape) != model[new]:
            mismatched.append((new, tuple(shape), model[new]))
        else:
            names[old] = new
    loaded = set(names.values())
    ties = {}
    partners = tied.partners(model_state)
    for name in model:
        if name not in loaded:
            partner = next((p for p in partners.get(name, ()) if p in loaded), None)
            if partner is not None:
                ties[name] = partner
    differ = {n for n, _, _ in mismatched}
    missing = [n for n in model if n not in loaded and n not in ties and n not in differ]
    parts = []
    if missing:
        parts.append("missing " + grouped_text(missing, model))
    if unexpected:
        parts.append("unexpected " + grouped_text(unexpected, saved))
    if mismatched:
        shown = ", ".join(f"{n}: {torch.Size(a)} in the file, {torch.Size(b)} in the model"
                          for n, a, b in mismatched[:3])
        parts.append(f"size mismatch for {shown}" + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""))
    report = LoadReport(tuple(missing), tuple(unexpected), tuple(mismatched), rename, tuple(ties.items()),
                        "; ".join(parts))
    return _Plan(names, ties, report)


def _hints(report: LoadReport, saved: Mapping[str, Any], model: Mapping[str, Any]) -> list[str]:
    """What to try when names do not fit: a submodule when several renamings fit, a prefix no name shares."""
    if report.renamed.rivals:
        return [f"several renamings fit equally ({'; '.join(report.renamed.rivals[:3])}), so none was made: load "
                "into the submodule the file holds (model=net.part)"]
    if not report.renamed and saved:
        tops = {k.split(".", 1)[0] for k in saved}
        if len(tops) == 1 and all("." in k for k in saved) and not tops & {k.split(".", 1)[0] for k in model}:
            return [f"every name in the file starts with {next(iter(tops)) + '.'!r}, which none of the model's does"]
    return []


STRICT_ADVICE = "load with strict=False to take what fits and get the rest listed"


def load_parts(module: torch.nn.Module, saved: Mapping[str, Any], parts: Iterable[Mapping[str, Any]], where: str,
               *, strict: bool = True, advice: str = STRICT_ADVICE) -> LoadReport:
    """Load a model's weights that come in ``parts`` (state dicts: one file's, or each shard's in turn), whose
    names and shapes are ``saved`` ({name: shape}), by the prefix rule (``renaming``) and the tied-weights rule
    (``tied.partners``). Checked before anything is loaded: ``strict`` refuses any missing, unexpected or
    differently shaped name (CheckpointError listing them, the model untouched); non-strict loads what fits and
    refuses only a file of which nothing fits. A renaming is said in a CheckpointWarning. ``advice`` ends a strict
    refusal: what the caller's user can do (the default names ``strict=False``)."""
    saved = {k: shape_of(v) for k, v in saved.items()}
    model_state = module.state_dict()
    plan = _plan(saved, model_state)
    report = plan.report
    kind = type(module).__name__
    if strict and not report.complete:
        hints = [*_hints(report, saved, model_state), *([advice] if advice else [])]
        done = f" (after it {report.renamed})" if report.renamed else ""
        raise CheckpointError(f"cannot restore {where} into {kind}{done}: {report.summary}; {'; '.join(hints)}")
    if not plan.names and model_state:
        hints = "".join(f"; {h}" for h in _hints(report, saved, model_state))
        raise CheckpointError(f"cannot restore {where} into {kind}: none of its {len(saved)} tensors fits the model "
                              f"({report.summary}){hints}")
    if report.renamed:
        warnings.warn(CheckpointWarning(f"{where}: {report.renamed} to fit {kind}'s names"), stacklevel=_outside())
    for part in parts:
        chunk = OrderedDict((k, v) for k, v in part.items() if k in plan.names)
        metadata = getattr(part, "_metadata", None)
        if metadata is not None:
            chunk._metadata = metadata  # type: ignore[attr-defined]  # per-module versions, renamed with the names
        chunk = renamed(chunk, report.renamed)
        for name, partner in plan.ties.items():
            if partner in chunk:
                chunk[name] = chunk[partner]  # the same memory in the model: loaded twice, as one
        try:
            module.load_state_dict(chunk, strict=False)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"cannot restore {where} into {kind}: {_one_line(e)}") from e
    return report


def load_into(obj: Any, state: Any, where: str, *, strict: bool = True,
              advice: str = STRICT_ADVICE) -> LoadReport | None:
    """``obj.load_state_dict(state)``, with torch's complaint (a missing key, a shape) as one clear line. A model
    (``nn.Module``) loads by ``load_parts``'s rules: prefixes, tied weights, ``strict``; its LoadReport is
    returned. Anything else loads as it is (``strict`` is for models only), returning None."""
    if isinstance(obj, torch.nn.Module) and isinstance(state, Mapping) and all(isinstance(k, str) for k in state):
        return load_parts(obj, state, [state], where, strict=strict, advice=advice)
    try:
        obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:  # a malformed state
        raise CheckpointError(f"cannot restore {where} into {type(obj).__name__}: {_one_line(e)}") from e
    return None


def _outside() -> int:
    """The ``stacklevel`` of the first caller outside etappe: a warning points at the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("etappe."):
        frame, level = frame.f_back, level + 1
    return level


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def grouped(keys: Iterable[str], universe: Iterable[str]) -> list[tuple[str, int]]:
    """``keys`` (a subset of ``universe``, in its order) in as few pieces as names allow: (``prefix.``, n) stands
    for all n names of ``universe`` under that dotted prefix, every one of them in ``keys``; (name, 1) for a
    single name."""
    chosen = set(keys)
    names = list(dict.fromkeys([*universe, *keys]))

    def walk(prefix: str, under: list[str]) -> list[tuple[str, int]]:
        picked = [n for n in under if n in chosen]
        if len(picked) <= 1:
            return [(n, 1) for n in picked]
        if prefix and len(picked) == len(under):
            return [(prefix, len(picked))]
        return walk_children(prefix, under)

    def walk_children(prefix: str, under: list[str]) -> list[tuple[str, int]]:
        children: dict[str, list[str]] = {}
        for n in under:
            rest = n[len(prefix):]
            head, dot, _ = rest.partition(".")
            children.setdefault(head + dot if dot else "\0" + n, []).append(n)
        out = []
        for child, members in children.items():
            if child.startswith("\0"):
                out += [(n, 1) for n in members if n in chosen]
            else:
                out += walk(prefix + child, members)
        return out

    return walk("", names)


def grouped_text(keys: Iterable[str], universe: Iterable[str], most: int = 6) -> str:
    """``grouped`` as text: ``head.* (4 keys), embed.weight``, at most ``most`` pieces and a count of the rest."""
    pieces = grouped(keys, universe)
    shown = [f"{p}* ({n} keys)" if n > 1 else p for p, n in pieces[:most]]
    rest = sum(n for _, n in pieces[most:])
    return ", ".join(shown) + (f" and {rest} more" if rest else "")
