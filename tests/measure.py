"""The memory tests' shorthand for `revnets.memory` on one forward (and backward) of `model(x)`."""
from revnets import memory


def saved_bytes(model, x):
    """Bytes of non-parameter tensors autograd keeps for the backward of one forward pass."""
    return memory.saved_bytes(model, lambda: model(x).sum())[0]


def peak_bytes(model, x):
    """Peak bytes held by the CPU allocator during one forward and backward, above what it held
    before and not counting the parameters' gradients (which grow with depth in every mode)."""
    return memory.peak_cpu_bytes(lambda: model(x).sum().backward()) - sum(
        p.numel() * p.element_size() for p in model.parameters())
