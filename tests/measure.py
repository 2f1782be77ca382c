"""What a training step keeps and allocates, measured for the memory tests: by what autograd saves
and by the allocator's events, never by the process's resident memory."""
import torch
from torch.profiler import ProfilerActivity, profile


def saved_bytes(model, x):
    """Bytes of non-parameter tensors autograd keeps for the backward of one forward pass."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def peak_bytes(model, x):
    """Peak bytes held by the CPU allocator during one forward and backward, above what it held
    before and not counting the parameters' gradients (which grow with depth in every mode): the
    running sum of the profiler's allocation and free events, not the process RSS."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x).sum().backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak - sum(p.numel() * p.element_size() for p in model.parameters())
