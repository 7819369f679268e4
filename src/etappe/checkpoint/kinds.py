"""What a saved thing is (module, optimizer, scheduler, scaler, other Stateful, plain value), told from the
object when saving and from the state_dict's shape when the object is gone (a plain torch.save file);
and putting a state back into an object."""

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from etappe.checkpoint.errors import CheckpointError

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


def unprefixed(state: Mapping[str, Any], model_keys: Iterable[str]) -> Mapping[str, Any]:
    """A module state_dict saved from a wrapped model (``torch.compile(m).state_dict()`` names every tensor
    ``_orig_mod.*``, DDP's ``module.*``) with the wrapper's prefix taken off, for a plain model whose keys are
    ``model_keys``: a prefix goes when every key of ``state`` carries it and no key of the model does (so a model
    with a submodule really named ``module`` keeps its names). Nested wrappers (compiled DDP) lose each prefix in
    turn; any other state comes back as it is."""
    keys = list(model_keys)
    while state and all(isinstance(k, str) for k in state):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)
                       and not any(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        stripped = OrderedDict(state)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            stripped._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]  # per-module versions
        consume_prefix_in_state_dict_if_present(stripped, prefix)  # keys and metadata
        state = stripped
    return state


def load_into(obj: Any, state: Any, where: str) -> None:
    """``obj.load_state_dict(state)``, with torch's complaint (a missing key, a shape) as one clear line. A model's
    state saved from a compiled or DDP-wrapped model loads into the plain model (``unprefixed``)."""
    if isinstance(obj, torch.nn.Module) and isinstance(state, Mapping):
        state = unprefixed(state, obj.state_dict().keys())
    try:
        obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:  # a malformed state
        said = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise CheckpointError(f"cannot restore {where} into {type(obj).__name__}: {said}") from e
