"""What several test files share: gradients through a chain or a model, an unstable chain, a DDP
worker, and what a step keeps (`revnets.memory` on one forward and backward)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from revnets import AdditiveCoupling, memory


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def chain_grads(run, blocks, a, b):
    """((x, y), gradients of a, b and every distinct parameter, flattened into one vector) of the
    loss sum(x^2) + sum(sin y) of `run(blocks, a, b) -> (x, y)`."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    for blk in dict.fromkeys(blocks):
        blk.zero_grad()
    x, y = run(blocks, a, b)
    ((x * x).sum() + y.sin().sum()).backward()
    params = [p for blk in dict.fromkeys(blocks) for p in blk.parameters()]
    return (x, y), torch.cat([t.flatten() for t in [a.grad, b.grad] + [p.grad for p in params]])


def model_grads(model, x, y=None, seed=None):
    """(output, gradients of the input (when it is a float) and of every parameter, one flat vector)
    of one backward of cross-entropy against `y` (class or next-token targets) or, without `y`, of
    sum(out^2) + sum(out). `seed` seeds the forward (the same dropout masks in two models)."""
    model.zero_grad()
    x = x.clone().requires_grad_() if x.is_floating_point() else x
    if seed is not None:
        torch.manual_seed(seed)
    out = model(x)
    loss = F.cross_entropy(out.flatten(0, -2), y.flatten()) if y is not None else out.pow(2).sum() + out.sum()
    loss.backward()
    grads = ([x.grad] if x.is_floating_point() else []) + [p.grad for p in model.parameters()]
    return out.detach(), torch.cat([g.flatten() for g in grads])


def bf16_grads(model, x):
    """Parameter gradients (float64, flat) of sum(out^2) under bf16 autocast (a float32 model), or in
    the model's own precision (a float64 reference)."""
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
        out = model(x.to(dtype) if x.is_floating_point() else x)
    out.float().pow(2).sum().backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def unstable_chain(n, scale=3.0, seed=0):
    """(blocks, a, b): RevNet-style couplings with unconstrained dense residual functions and large
    weights: the forward stays bounded, the inverse amplifies rounding exponentially."""
    torch.manual_seed(seed)

    def f():
        return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    blocks = nn.ModuleList(AdditiveCoupling(f(), f()) for _ in range(n))
    for m in blocks.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=scale / 4)
    return blocks, torch.randn(4, 16), torch.randn(4, 16)


def ddp_worker(rank, world, store, model, x, y, out_file):
    """One of `world` spawned processes: DDP over `model` (each process holds the same weights), one
    backward of cross-entropy on this rank's shard of (x, y); rank 0 saves the parameters' gradients."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ddp = nn.parallel.DistributedDataParallel(model)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    F.cross_entropy(ddp(x[shard]).flatten(0, -2), y[shard].flatten()).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out_file)
    dist.barrier()  # both ranks done before either tears the group down (gloo aborts otherwise)
    dist.destroy_process_group()


def saved_bytes(model, x):
    """Bytes of non-parameter tensors autograd keeps for the backward of one forward pass."""
    return memory.saved_bytes(model, lambda: model(x).sum())[0]


def peak_bytes(model, x):
    """Peak bytes held by the CPU allocator during one forward and backward, above what it held
    before and not counting the parameters' gradients (which grow with depth in every mode)."""
    return memory.peak_cpu_bytes(lambda: model(x).sum().backward()) - sum(
        p.numel() * p.element_size() for p in model.parameters())
