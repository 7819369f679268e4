"""Tied weights (an embedding and an output layer sharing one tensor): the one rule for tensors that share memory.

Two tensors are one tied weight when they are the same view of the same memory: the same storage, offset, shape,
strides, dtype and device (``key``). Then:

- an etappe checkpoint stores it once, and every name it had gets the same tensor back (``codec``);
- restoring into an optimizer copies it once, so it stays tied (``owned``);
- inspection counts its parameters and bytes once (``distinct``);
- a file for other readers (a plain safetensors export, a run's model.safetensors) gives each name a copy of its
  own (``untied``): safetensors refuses tensors that share memory, and its readers expect every name that
  ``load_state_dict`` wants;
- loading into a model that ties two names, a file that stores only one of them (as
  ``safetensors.torch.save_model`` writes it) fills the other from its tie (``partners``), as
  ``safetensors.torch.load_model`` does: loading one loads both, they are one memory.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def key(t: torch.Tensor) -> tuple | None:
    """Equal for two tensors exactly when they are the same view of the same memory; None for a tensor without
    memory of its own (no bytes, or a sparse layout), which is never tied to another."""
    if t.layout != torch.strided:
        return None
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return (storage.data_ptr(), t.device, t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def distinct(values: Iterable[Any]) -> list[Any]:
    """``values`` with each tied weight once (in first-seen order); anything that is not a torch tensor (a
    stand-in that only describes one) is told apart by identity."""
    seen, out = set(), []
    for v in values:
        ident = (key(v) if isinstance(v, torch.Tensor) else None) or id(v)
        if ident not in seen:
            seen.add(ident)
            out.append(v)
    return out


def owned(value: Any, copies: dict | None = None) -> Any:
    """``value`` (a state tree) with every tensor copied into memory of its own, tied ones copied once and so still
    tied to each other."""
    copies = {} if copies is None else copies
    if isinstance(value, torch.Tensor):
        ident = key(value) or id(value)
        if ident not in copies:
            copies[ident] = value.clone()
        return copies[ident]
    if isinstance(value, dict):
        return {k: owned(v, copies) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(owned(v, copies) for v in value)
    return value


def untied(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` (a state_dict), each name with a contiguous copy of its own: what a plain
    safetensors writer takes and what its readers give back under every name."""
    return {k: v.detach().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}


def partners(state: Mapping[str, Any]) -> dict[str, list[str]]:
    """For each name of ``state`` (a model's own state_dict) whose tensor is tied to others', those other names,
    in ``state``'s order. Tensors on the meta device have no memory to share and are never tied."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ident = key(t)
            if ident is not None:
                groups.setdefault(ident, []).append(name)
    return {n: [m for m in names if m != n] for names in groups.values() if len(names) > 1 for n in names}
