"""Sharded state (FSDP2) inside an etappe checkpoint, written and read by ``torch.distributed.checkpoint``.

Every rank writes its own shards of the model and optimizer with DCP into a subfolder of the checkpoint
(``shards-<random>/``: ``__<rank>_<n>.distcp`` per rank and DCP's ``.metadata``), hashes what it wrote, and
rank 0 lists all of it in the manifest, so the one commit, the checksums and the fallback cover the shards as
they cover every other file. Loading goes through DCP too, which reshards: a checkpoint from N ranks loads on M
ranks, or into a plain model in one process.

DCP keeps its metadata as a pickle, and small values as ``torch.save`` blobs that its load planners unpickle fully:
everything sharded is read through the reader and planners of safe_dcp.py, which refuse to run anything, and only
files the manifest lists are read.
"""

from __future__ import annotations

import math
import re
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from etappe.checkpoint import fsio, kinds, manifest
from etappe.checkpoint.errors import CheckpointError
from etappe.errors import UsageError

PREFIX = manifest.SHARDS


@dataclass(frozen=True)
class Shards:
    """A sharded entry as read from state.json: where its shards are, which files the manifest lists there, and
    under which key DCP holds the entry."""

    folder: Path  # the checkpoint folder
    record: Mapping[str, Any]
    listed: frozenset[str]  # file names in the shards subfolder, as the manifest lists them

    @classmethod
    def of(cls, folder: Path, record: Mapping[str, Any], files: Mapping[str, Any]) -> "Shards":
        sub = record.get("shards")
        if not (isinstance(sub, str) and _SUBFOLDER.fullmatch(sub) and f"{sub}/.metadata" in files
                and isinstance(record.get("key"), str)):
            raise CheckpointError(f"{folder}: a sharded entry names shards {sub!r} that the manifest does not list")
        listed = frozenset(name.split("/", 1)[1] for name in files if name.startswith(sub + "/"))
        return cls(folder, record, listed)

    @property
    def directory(self) -> Path:
        return self.folder / self.record["shards"]

    def reader(self):
        from etappe.checkpoint.safe_dcp import SafeReader

        return SafeReader(self.directory, self.listed)


_SUBFOLDER = re.compile(re.escape(PREFIX) + "[0-9a-f]{8}")


def is_sharded(obj: Any) -> bool:
    """Whether ``obj`` is a module with sharded (DTensor) parameters."""
    return isinstance(obj, torch.nn.Module) and is_sharded_module(obj)


def is_sharded_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` (or a submodule) holds DTensor parameters, as FSDP2's ``fully_shard`` leaves it."""
    from etappe import distributed

    if not distributed.active():
        return False  # sharding needs a process group; and this spares importing DTensor
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict of whole tensors: for a sharded module gathered on every rank (collective; rank 0
    gets them, on the CPU), otherwise the unwrapped module's own."""
    from etappe.state import unwrap

    if not is_sharded_module(module):
        return unwrap(module).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ------------------------------------------------------------------ writing (every rank)


def write(target: Path | None, objects: Mapping[str, Any]) -> tuple[dict[str, dict], dict[str, tuple[int, str]]]:
    """Collective: every rank calls it with the same ``objects`` ({"model": module, "optimizer": optimizer of that
    module}); rank 0 passes the folder being written (``target``), the others None. Returns, on rank 0, the
    state.json records of the entries and the files written ({relative name: (size, checksum)}); elsewhere empty.
    A failure on any rank raises CheckpointError on every rank (rank 0 then removes what was written).
    """
    import torch.distributed.checkpoint as dcp

    from etappe import distributed

    module_name, module, optimizers = _split(objects)
    where: list = [None, None, None]  # rank 0 picks the subfolder and makes it; every rank writes into it
    if target is not None:
        sub = f"{PREFIX}{secrets.token_hex(4)}"
        try:
            (target / sub).mkdir()
            where = [str(target / sub), sub, None]
        except OSError as e:
            where = [None, None, f"cannot make {target / sub}: {e.strerror}"]
    where = distributed.broadcast_object(where)
    if where[2] is not None:
        raise CheckpointError(where[2])
    directory, sub = Path(where[0]), where[1]
    try:
        try:
            state = _state_dicts(module_name, module, optimizers)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, sync_files=True, overwrite=False))
        except _failures() as e:  # DCP gathers every rank's failure and raises it on all of them
            raise _dcp_error(e, f"writing the shards into {directory} failed") from None
        mine = _hash_own_files(directory, sub, distributed.rank())
        gathered = distributed.all_gather_object(mine)
        failed = [part["error"] for part in gathered if "error" in part]
        if failed:
            raise CheckpointError(f"reading back the shards in {directory} failed: {failed[0]}")
        if target is None:
            return {}, {}
        files = {name: entry for part in gathered for name, entry in part.items()}
        from etappe.checkpoint.safe_dcp import SafeReader

        SafeReader(directory, {name.split("/", 1)[1] for name in files}).read_metadata()  # every file it names is listed
        fsio.fsync_dir(directory)
    except BaseException:
        if target is not None:
            fsio.remove_quietly(directory)
        raise
    records = {module_name: {"kind": kinds.MODULE, "type": _unsharded_type(module), "shards": sub, "key": module_name,
                             "parameters": sum(p.numel() for p in module.parameters())}}
    for name, opt in optimizers.items():
        records[name] = {"kind": kinds.OPTIMIZER, "type": kinds.type_name(opt), "shards": sub, "key": name,
                         "module": module_name}
    return records, files


def write_failed(message: str) -> None:
    """Rank 0 failed before ``write``: tell the ranks waiting in it, so every rank raises instead of hanging."""
    from etappe import distributed

    distributed.broadcast_object([None, None, message])


def _split(objects: Mapping[str, Any]) -> tuple[str, torch.nn.Module, dict[str, Any]]:
    modules = {n: o for n, o in objects.items() if isinstance(o, torch.nn.Module)}
    optimizers = {n: o for n, o in objects.items() if not isinstance(o, torch.nn.Module)}
    if len(modules) != 1 or len(optimizers) > 1:
        raise UsageError(f"sharded checkpoints hold one model and at most one optimizer, got {', '.join(objects)}")
    (module_name, module), = modules.items()
    return module_name, module, optimizers


def _hash_own_files(directory: Path, sub: str, rank: int) -> dict:
    """{"<sub>/<file>": (size, checksum)} of the files this rank wrote (rank 0: DCP's .metadata too)."""
    mine = {}
    try:
        for path in sorted(directory.iterdir()):
            if path.name.startswith(f"__{rank}_") or (rank == 0 and path.name == ".metadata"):
                hasher, size = manifest.new_hasher(), 0
                with open(path, "rb") as f:  # just written: read back from the page cache
                    while piece := f.read(8 << 20):
                        hasher.update(piece)
                        size += len(piece)
                mine[f"{sub}/{path.name}"] = (size, hasher.hexdigest())
    except OSError as e:
        return {"error": f"rank {rank}: {e.strerror} ({e.filename})"}
    return mine


def _failures() -> tuple[type[BaseException], ...]:
    """What a DCP call raises: its CheckpointException (a BaseException) or any error. Imported only when one
    happens, since importing DCP is slow."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _dcp_error(e: BaseException, what: str) -> CheckpointError:
    """A failure of DCP as one CheckpointError: a rank's own CheckpointError as it was raised (DCP wraps it in a
    CheckpointException of every rank's failures), anything else in one line after ``what``."""
    from torch.distributed.checkpoint.api import CheckpointException

    from etappe.checkpoint.safe_dcp import one_line

    causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
    for cause in causes:
        if isinstance(cause, CheckpointError):
            return cause
    return CheckpointError(f"{what}: " + "; ".join(f"{type(c).__name__}: {one_line(c)}" for c in causes))


def _unsharded_type(module: torch.nn.Module) -> str:
    """The model's own class name, not the FSDP<Name> class ``fully_shard`` swaps in."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    return f"{cls.__module__}.{cls.__qualname__}"


def _state_dicts(module_name: str, module: torch.nn.Module, optimizers: Mapping[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizers:
        return {module_name: get_model_state_dict(module)}
    (name, opt), = optimizers.items()
    model_state, optimizer_state = get_state_dict(module, opt)
    return {module_name: model_state, name: optimizer_state}


# ------------------------------------------------------------------ reading


def restore(path: Path, entries: Mapping[str, Any], objects: Mapping[str, Any]) -> None:
    """Load the sharded ``entries`` into ``objects`` (a module, with its optimizer if that is restored too), through
    DCP with resharding. Collective under torch.distributed: every rank restores together."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from etappe.checkpoint import safe_dcp

    names = [n for n in objects if isinstance(entries[n], Shards)]
    modules = [n for n in names if isinstance(objects[n], torch.nn.Module)]
    for n in names:
        if n not in modules and entries[n].record.get("module") not in modules:
            raise UsageError(f"{path}: the sharded optimizer {n!r} is restored together with its model "
                             f"{entries[n].record.get('module')!r}; pass both")
    for module_name in modules:
        optimizers = {n: objects[n] for n in names if entries[n].record.get("module") == module_name}
        module = objects[module_name]
        state = _state_dicts(module_name, module, optimizers)
        keys = {module_name: entries[module_name].record["key"], **{n: entries[n].record["key"] for n in optimizers}}
        try:
            with warnings.catch_warnings():  # one process alone is what we mean; DCP warns about it
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load({keys[n]: s for n, s in state.items()}, storage_reader=entries[module_name].reader(),
                         planner=safe_dcp.SafeLoadPlanner(where=entries[module_name].directory))
        except _failures() as e:
            raise _dcp_error(e, f"cannot restore {path} entry {module_name!r} from its shards") from None
        if optimizers:
            (opt_name, opt), = optimizers.items()
            set_state_dict(module, opt, model_state_dict=state[module_name], optim_state_dict=state[opt_name])
        else:
            set_model_state_dict(module, state[module_name])


def restore_whole(path: Path, entries: Mapping[str, Any], objects: Mapping[str, Any]) -> set[str]:
    """Load entries saved whole (by one process, or under DDP) into sharded modules and their optimizers: each rank
    keeps its own shards. Returns the names restored. The optimizer's saved state is keyed by position, as
    torch's is; position i is the i-th parameter of its param groups now, named as the module names it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True)
    done = set()
    for name, module in objects.items():
        if not is_sharded(module) or isinstance(entries[name], Shards):
            continue
        set_model_state_dict(module, entries[name], options=whole)
        done.add(name)
        names = {id(p): fqn for fqn, p in module.named_parameters()}
        for opt_name, opt in objects.items():
            saved = entries[opt_name]
            if not isinstance(opt, torch.optim.Optimizer) or isinstance(saved, Shards):
                continue
            params = [p for group in opt.param_groups for p in group["params"]]
            if not params or any(id(p) not in names for p in params):
                continue
            try:
                by_position = {i: names[id(p)] for i, p in enumerate(params)}
                state = {
                    "state": {by_position[int(i)]: s for i, s in saved["state"].items()},
                    "param_groups": [{**g, "params": [by_position[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
                }
                set_optimizer_state_dict(module, opt, state, options=whole)
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"cannot restore {path} entry {opt_name!r} into the sharded optimizer: {e}") from e
            done.add(opt_name)
    return done


def materialize(shards: Shards) -> Any:
    """The full (unsharded) state of a sharded entry, read in this process alone: a module's state_dict of whole
    tensors, an optimizer's state keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from etappe.checkpoint.safe_dcp import SafeEmptyStateDictLoadPlanner

    state: dict[str, Any] = {}
    key = shards.record["key"]
    # What torch.distributed.checkpoint.format_utils.dcp_to_torch_save does: build the state from the metadata.
    try:
        _load_state_dict(state, storage_reader=shards.reader(),
                         planner=SafeEmptyStateDictLoadPlanner(keys={key}, where=shards.directory), no_dist=True)
    except _failures() as e:
        raise _dcp_error(e, f"cannot read the shards in {shards.directory}") from None
    return state[key]


def tensor_infos(shards: Shards) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """{name: (shape, dtype, bytes)} of the whole tensors of a sharded entry, from DCP's metadata alone."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    key = shards.record["key"] + "."
    listed = getattr(shards.reader().read_metadata(), "state_dict_metadata", None)
    if not isinstance(listed, Mapping):
        raise CheckpointError(f"{shards.directory / '.metadata'}: DCP metadata without a list of its values")
    out = {}
    for name, md in listed.items():
        if isinstance(name, str) and name.startswith(key) and isinstance(md, TensorStorageMetadata):
            size, dtype = md.size, getattr(md.properties, "dtype", None)
            if not (isinstance(size, tuple) and all(type(d) is int and d >= 0 for d in size)
                    and isinstance(dtype, torch.dtype)):
                raise CheckpointError(f"{shards.directory / '.metadata'}: tensor {name[:80]!r} has size "
                                      f"{str(size)[:80]} and dtype {str(dtype)[:40]}, not a shape and a torch dtype")
            out[name.removeprefix(key)] = (tuple(size), str(dtype).removeprefix("torch."), math.prod(size) * dtype.itemsize)
    return out
