"""Runs on several processes (torchrun): the process group, the wrapped model, sums over processes,
and checkpoints that are full state dicts however the model is distributed.

Under torchrun (RANK and WORLD_SIZE set; ``torchrun --nproc_per_node N -m revnets.cli train ...``)
each process trains on its share of every global batch, with DistributedDataParallel (the default:
every process holds the whole model) or, with --fsdp, PyTorch's FSDP2 (`fully_shard` on every block,
then on the root: each process holds 1/N of the parameters, gradients and optimiser state, and a
block's parameters are gathered while it runs); nccl on CUDA, gloo on CPU. BatchNorm uses
per-process statistics; metrics are summed over processes; only rank 0 writes files. A checkpoint
holds the full model and optimiser state (`model_state`, `optimizer_state`: gathered from the shards
with torch.distributed.checkpoint's full state dicts, the optimiser's keyed by parameter names), so
it loads into a run with or without --fsdp, on any number of processes, and into `revnets.load`.
"""
import os
import resource

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
try:  # FSDP2, public since torch 2.6 (--fsdp refuses to start without it)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:
    FSDPModule = ()

from .. import checkpoint
from ..blocks import BasicBlock, ReversibleBlock
from ..layers import ResidualLayer
from .settings import check_device
from .step import AMP_DTYPES


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
    """What the training step calls: the model, in DDP when distributed, compiled with `compile`
    (`torch.compile`; its reversible chains compile their residual functions, see revnets.engine)."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def shard(model: nn.Module, amp: str = "off") -> nn.Module:
    """FSDP2 over the processes: `fully_shard` on every block (a reversible block, a ResNet block, a
    residual transformer layer), then on the root, in place. With `amp` bf16 or fp16 the blocks
    compute in that precision from parameters gathered in it (FSDP's MixedPrecisionPolicy) and
    reduce gradients in float32."""
    dtype = AMP_DTYPES[amp]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for module in list(model.modules()):
        if isinstance(module, (ReversibleBlock, BasicBlock, ResidualLayer)):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _options(model: nn.Module) -> StateDictOptions:
    """Full state dicts, gathered to the CPU, from the shards of an FSDP model."""
    return StateDictOptions(full_state_dict=sharded(model), cpu_offload=sharded(model))


def model_state(model: nn.Module) -> dict:
    """The model's full state dict (an FSDP model's gathered to the CPU of rank 0: every rank must call)."""
    return get_model_state_dict(model, options=_options(model)) if sharded(model) else model.state_dict()


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser's full state dict, keyed by parameter names (every rank must call)."""
    return get_optimizer_state_dict(model, opt, options=_options(model))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer_state`'s dict into `opt` (a dict keyed by parameter indices, as `opt.state_dict()`
    writes it and checkpoints before 2026-12-07 hold, loads as it is)."""
    if all(isinstance(k, int) for k in state["state"]):
        opt.load_state_dict(state)
    else:
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=sharded(model)))


def nonfinite(model: nn.Module, world: int) -> int:
    """How many parameter and buffer entries are NaN or infinite, over every process's shards."""
    local = {k: t.to_local() if hasattr(t, "to_local") else t for k, t in model.state_dict().items()}
    count = torch.tensor(float(checkpoint.count_nonfinite(local)))
    if sharded(model) and world > 1:
        dist.all_reduce(count)
    return int(count)


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
