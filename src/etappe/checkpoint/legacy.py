"""Plain ``torch.save`` files (.pt, .pth, .tar) and bare .safetensors files, in the layouts the seeds use.

Opened with ``torch.load(weights_only=True)``, which builds only tensors and plain containers. A file that
needs full unpickling (a whole pickled model or optimizer) is refused unless the caller passes trusted=True.
"""

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from etappe.checkpoint import kinds
from etappe.checkpoint.errors import CheckpointError
from etappe.errors import UsageError

# A saved key, with these endings or in this table, also answers to the name on the right: load(f, model=net)
# finds 'model_state_dict', 'state_dict' or 'model'; load(f, modelA=a) finds 'modelA_state_dict'.
_SUFFIXES = ("_state_dict", "_state", "_sd")
_ALIASES = {
    "state_dict": "model", "net": "model", "network": "model", "model_state": "model",
    "optim": "optimizer", "opt": "optimizer",
    "lr_sched": "scheduler", "lr_scheduler": "scheduler", "sched": "scheduler",
    "grad_scaler": "scaler", "amp_scaler": "scaler",
}  # fmt: skip
BARE = "model"  # the name a bare state_dict (a file holding just one model's weights) answers to


def read(path: Path, *, trusted: bool = False) -> Any:
    """The object stored in ``path``, opened without running code from the file unless ``trusted``."""
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError for any malformed file
            raise CheckpointError(f"{path}: not a readable safetensors file: {_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        if trusted or not (culprit or re.search(r"Unsupported (global|class)", str(e))):
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            reason = detail[1] if detail else _first_line(e)
            raise CheckpointError(f"{path}: not a readable torch.save file: {reason}") from None
        what = f" (it refers to {culprit[1]})" if culprit else ""
        raise CheckpointError(
            f"{path}: refused: opening it needs full unpickling{what}, which runs whatever code the file holds. "
            "If you trust where it came from, load it with trusted=True (CLI: --trust); "
            "better, re-save its state_dict()s, which open safely."
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{path}: not a readable torch.save file: {_first_line(e)}") from None


def entries(obj: Any) -> dict[str, Any]:
    """The file's content as named entries: a bare state_dict becomes {'model': it}, a dict stays itself."""
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        if kinds.of_state(obj) == kinds.MODULE:
            return {BARE: obj}
        return dict(obj)
    if kinds.is_stateful(obj):
        return {BARE: obj}
    return {"value": obj}


def load(path: Path, objects: Mapping[str, Any], *, trusted: bool = False) -> dict[str, Any]:
    """Restore ``objects`` from a plain file by name (see ``_match``); return the entries not restored."""
    found = entries(read(path, trusted=trusted))
    plan = {}
    for name, obj in objects.items():
        if not kinds.is_stateful(obj):
            raise UsageError(
                f"cannot restore {name!r} into a {type(obj).__name__}: pass objects with load_state_dict(); "
                "plain values come back in load()'s result"
            )
        key = _match(name, obj, found, taken=set(plan.values()))
        if key is None:
            raise CheckpointError(f"{path} has nothing for {name!r}; it holds: {', '.join(map(str, found))}")
        plan[name] = key
    for name, key in plan.items():
        state = found[key]
        if kinds.is_stateful(state):  # a trusted file's whole pickled object
            state = state.state_dict()
        kinds.load_into(objects[name], state, f"{path} entry {key!r}")
    return {k: v for k, v in found.items() if k not in plan.values()}


def verify(path: Path) -> None:
    """Check a plain file as far as it can be checked: the CRC-32 of every member of a torch.save zip archive."""
    if path.suffix == ".safetensors":
        read(path)
        return
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip-format torch.save file, so it holds no checksums to verify")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt torch.save archive: {_first_line(e)}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: member {bad} fails its CRC-32 check; the file is corrupt")


def _match(name: str, obj: Any, found: Mapping[str, Any], taken: set[str]) -> str | None:
    """The saved key for requested ``name``: the same key, a key that answers to it, or else the one
    remaining entry of the object's kind (load(f, model=net) on a file with a single 'netG_state_dict')."""
    free = [k for k in found if k not in taken]
    if name in free:
        return name
    answering = [k for k in free if _answers_to(k) == name]
    if len(answering) == 1:
        return answering[0]
    kind = kinds.of_object(obj)
    same_kind = [k for k in free if kinds.of_state(found[k]) == kind]
    return same_kind[0] if len(same_kind) == 1 else None


def _answers_to(key: str) -> str:
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return _ALIASES.get(key, key)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
