"""What a training step keeps and allocates, measured without the process's resident memory (which
also counts what the C allocator keeps after a free, and pages of earlier steps).

`saved_bytes` counts the tensors autograd saves for the backward; `peak_cpu_bytes` follows the CPU
allocator's own events during a step. The memory tests and benchmarks measure with these two.
"""
from typing import Any, Callable

import torch
from torch import nn


def saved_bytes(model: nn.Module, forward: Callable[[], Any]) -> tuple[int, Any]:
    """(bytes, output) of `forward()`: the bytes of the non-parameter tensors that autograd keeps
    for the backward while it runs (`torch.autograd.graph.saved_tensors_hooks`; `model`'s
    parameters are not counted), and what `forward` returns."""
    params, total = {p.data_ptr() for p in model.parameters()}, 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size() if t.data_ptr() not in params else 0
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return total, out


def peak_cpu_bytes(step: Callable[[], Any]) -> int:
    """The peak bytes the CPU allocator held during `step()` above what it held before: the running
    sum of the profiler's allocation and free events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak
