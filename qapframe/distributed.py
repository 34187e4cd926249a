"""Multi-process evaluation on `torch.distributed`, as launched by ``torchrun`` or ``accelerate launch``.

Both launchers export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
`init_from_env` joins the process group they describe (gloo on CPU, nccl on CUDA). Every helper is
a no-op in a single process, so library code (e.g. a quantizer's calibration statistics) can call
`all_reduce_` unconditionally.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Literal, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
ReduceOp = Literal["sum", "max", "min"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def env_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when launched as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join the launcher's process group if ``WORLD_SIZE > 1``; returns whether running distributed.

    ``device`` picks the backend: nccl for CUDA, gloo otherwise. Already-initialised groups (e.g. by
    accelerate's ``PartialState``) are reused as they are.
    """
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return is_distributed()


def _comm_device() -> torch.device:
    # nccl moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place (sum, max or min) and return it; no-op in one process.

    The hook for calibration statistics (GPTQ Hessians, activation maxima): every rank calibrates on
    its shard of the calibration data, then all ranks hold the same statistic and quantize identically.
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce_: op must be one of {sorted(_OPS)}, got {op!r}")
    if not is_distributed():
        return tensor
    device = _comm_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=_OPS[op])
    else:
        buffer = tensor.to(device)
        dist.all_reduce(buffer, op=_OPS[op])
        tensor.copy_(buffer)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`all_reduce_` with ``op="sum"``."""
    return all_reduce_(tensor, "sum")


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process); must be called on all ranks."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """Rank r's share ``items[r::world]``: deterministic, disjoint, covering all items."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


def destroy() -> None:
    """Leave the process group (at the end of a run launched by torchrun/accelerate)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "all_gather_objects",
    "all_reduce_",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "destroy",
    "env_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
    "shard",
    "world_size",
]
