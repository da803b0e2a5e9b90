"""Distributed setup on PyTorch's own engine: the process group from torchrun's environment, DDP.

Under ``torchrun --nproc_per_node N`` each process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
from its environment, takes GPU ``LOCAL_RANK`` when CUDA is there, and joins one process group
(NCCL on GPUs, gloo on CPUs). A plain ``python`` run is a world of one and starts no group. The
group's timeout turns a peer that stops answering into an error rather than a hang; a peer that
dies is torchrun's to notice: it stops the others and the job exits non-zero.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "resolve_device", "init_distributed", "all_gather_object", "all_reduce_sum",
           "check_same_on_all_ranks", "wrap_ddp"]

_DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and saves."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_device(device: Union[None, str, torch.device], local_rank: Optional[int] = None) -> torch.device:
    """The device to train on: ``None`` picks ``cuda:<local_rank>`` when CUDA is there, else the CPU.

    ``local_rank`` defaults to torchrun's ``LOCAL_RANK`` (0 in a plain run); a bare ``'cuda'`` means
    that GPU too.

    Example:
        >>> resolve_device('cpu')
        device(type='cpu')
    """
    if local_rank is None:
        local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is not a device; allowed: 'cpu', 'cuda' or 'cuda:<index>'") from error
    if resolved.type not in _DEVICE_TYPES:
        raise ValueError(f"device={device!r} is not supported; allowed: 'cpu', 'cuda' or 'cuda:<index>'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device='cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: torch.device, timeout_s: float) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or return a world of one.

    A group the caller started already is used as it is. One started here is destroyed at exit.

    Example:
        >>> init_distributed(torch.device('cpu'), timeout_s=60).world_size   # a plain python run
        1
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    if world_size == 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this PyTorch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(_destroy_group)
    return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def _destroy_group() -> None:
    if dist.is_initialized():
        # A DDP wrapper kept alive by a reference cycle still holds the group; destroying the group
        # under it aborted gloo jobs at exit now and then ("terminate called without an active
        # exception"). Collect such cycles first. No barrier here: a rank exiting on an error must
        # not wait for peers that will never come.
        gc.collect()
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in a world of one).

    Example:
        >>> all_gather_object({'rank': 0})
        [{'rank': 0}]
    """
    if not _distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (it must be on the group's device).

    Example:
        >>> all_reduce_sum(torch.ones(2))
        tensor([1., 1.])
    """
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_same_on_all_ranks(settings: dict[str, Any]) -> None:
    """Raise a ValueError on every rank when a setting differs between ranks.

    Mismatched settings (dataloader lengths, durations) would otherwise leave ranks waiting on
    collectives that never match.

    Example:
        >>> check_same_on_all_ranks({'dataloader_len': 10})
    """
    everyone = all_gather_object(settings)
    for name, value in settings.items():
        values = [ranks_settings[name] for ranks_settings in everyone]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"{name} must be the same on every rank, got {per_rank}")


def wrap_ddp(model: nn.Module, device: torch.device, context: DistContext) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when the world is larger than one, else ``model``.

    Example:
        >>> wrap_ddp(nn.Linear(2, 2), torch.device('cpu'), DistContext())
        Linear(in_features=2, out_features=2, bias=True)
    """
    if context.world_size == 1:
        return model
    device_ids: Optional[list[int]] = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
