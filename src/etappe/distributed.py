"""torch.distributed, as torchrun sets it up: a few plain functions and nothing home-made.

Outside torchrun every function answers as for a single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is in a process group (torchrun's, joined by ``init_from_env``)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU). Returns whether one was joined."""
    global _joined
    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", 1)) == 1 or active():
        return active()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    _joined = True
    return True


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: shard ``model``'s parameters across the ranks, in place (``fully_shard`` on every submodule that owns
    parameters, innermost first, then on the whole model). Create the optimizer after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    model.to(device)
    for module in reversed(list(model.modules())[1:]):
        if next(module.parameters(recurse=False), None) is not None:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64, so sums of sample-weighted losses stay exact enough)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


_joined = False  # etappe joined the group (init_from_env), so etappe leaves it; a caller's own group stays theirs
_left = False


def shutdown(clean: bool = True) -> None:
    """Leave the process group etappe joined. After a clean finish the ranks leave together (one that leaves while
    the others still talk to it can hang them); after a failure this rank just goes, and torchrun stops the rest."""
    global _joined, _left
    if _joined and active():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        _joined, _left = False, True


def left_a_group() -> bool:
    """Whether etappe joined a process group in this process and has left it (``shutdown``)."""
    return _left


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order (a list of one outside a process group)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (``obj`` itself outside a process group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(*flags: bool) -> list[bool]:
    """For each flag, whether it is true on any rank, so every rank takes the same branch."""
    if not active():
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
