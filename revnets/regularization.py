"""Weight smoothness in depth, Eq. (22)."""
from torch import Tensor, nn


def smoothness_penalty(model: nn.Module) -> Tensor:
    """R_h(K) = h sum_j sum_k ||(K_{j,k} - K_{j+1,k}) / h||_F^2, Eq. (22).

    Sums over consecutive blocks j, j + 1 of each unit of `model.units` and over their convolution
    kernels k, pairing the k-th kernel of one block with the k-th of the next where their shapes
    agree (a unit's widening entry block pairs with nothing). h is block j's step (1 where a block
    has none: RevNet, ResNet). Returns a scalar that is differentiable in the kernels.
    """
    total = model.head.weight.new_zeros(())
    for unit in model.units:
        blocks = list(unit)
        kernels = [[m.weight for m in b.modules() if isinstance(m, nn.Conv2d)] for b in blocks]
        for j in range(len(blocks) - 1):
            h = getattr(blocks[j], "h", 1.0)
            for k0, k1 in zip(kernels[j], kernels[j + 1]):
                if k0.shape == k1.shape:
                    total = total + (k0 - k1).pow(2).sum() / h
    return total
