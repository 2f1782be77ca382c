"""Runs on several processes (torchrun): the process group, the wrapped model, sums over processes.

Under torchrun (RANK and WORLD_SIZE set; ``torchrun --nproc_per_node N -m revnets.cli train ...``)
each process trains on its share of every global batch with DistributedDataParallel (nccl on CUDA,
gloo on CPU); BatchNorm uses per-process statistics; metrics are summed over processes; only rank 0
writes files.
"""
import os
import resource

import torch
import torch.distributed as dist
from torch import nn

from .settings import check_device


def setup(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, this process's device); joins torchrun's process group if there is one."""
    distributed = dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        return 0, 1, check_device(device)
    if device == "cuda":  # one GPU per process
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), check_device(device)


def wrap(model: nn.Module, device: torch.device, world: int, compile: bool) -> nn.Module:
    """What the training step calls: the model, in DDP when distributed, compiled with `compile`."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def all_reduce(t: torch.Tensor, world: int) -> list[float]:
    """The (n,) tensor `t` summed over processes (itself when not distributed), as floats: one host sync."""
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(model: nn.Module, world: int) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every process, as in its checkpoint (DDP's next
    forward does the same)."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def peak_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory since the last reset; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_label(device: torch.device) -> str:
    """What `peak_mb` measures on `device`, as the epoch line labels it."""
    return "GPU allocator peak" if device.type == "cuda" else "process peak RSS"
