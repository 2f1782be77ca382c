"""Reversal drift versus depth, and what bounding it costs: segment storage and exact reversal.

    python benchmarks/drift.py                         # CPU: depths 100 400 1000, every scheme
    python benchmarks/drift.py --depths 100 --record   # append the tables to BENCHMARKS.md
    python benchmarks/drift.py --depths 10000 --epochs 0 --schemes hamiltonian   # drift only

Each model is one unit of N reversible blocks (plus its entry block) at `--channels` channels,
`revnets.build_model(name, units=(N + 1,), channels=(C,))`, default weights (h = 0.1), on one batch
of `--batch` random `--size`x`--size` images. Three tables:

1. reversal error ||rebuilt - input|| / ||input|| of the chain's input after N blocks forward and
   N back (`revnets.reversal_error`), with the state in float64, float32, bfloat16 and with
   exact fixed-point reversal (`exact=True`, int64 state, 32 fraction bits, float32 updates);
2. gradient error ||g - g64|| / ||g64|| of one cross-entropy step against float64 plain autograd,
   for float32 plain autograd, pure reversal, segment storage with k chosen by `segment="auto"`
   (tolerance 1e-5) and exact reversal; the bytes each keeps for the backward (saved tensors,
   parameters excluded) and its step time (median of `--repeats`, interleaved); up to
   `--max-gradient-depth` blocks;
3. the accuracy cost of exact reversal in training: a small Hamiltonian network trained on
   scikit-learn's 8x8 digits with the float32 engine and with exact=True from the same weights and
   batches (`--epochs`, 0 to skip).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import revnets
from revnets import reversal_error
from revnets.training import train_step
from common import markdown, record

SCHEMES = {"hamiltonian": "hamiltonian-74", "midpoint": "midpoint-26", "leapfrog": "leapfrog-26",
           "revnet": "revnet-38"}


def build(name: str, n: int, channels: int, dtype=torch.float32, **kw) -> revnets.Network:
    torch.manual_seed(0)  # the same weights in every variant
    return revnets.build_model(name, units=(n + 1,), channels=(channels,), **kw).to(dtype)


def drift_row(name: str, n: int, channels: int, x: torch.Tensor) -> dict:
    row = dict(scheme=name.split("-")[0], N=n)
    for label, dtype in (("float64", torch.float64), ("float32", torch.float32), ("bf16", torch.bfloat16)):
        row[label] = reversal_error(build(name, n, channels, dtype), x.to(dtype))["unit0"]
    row["exact"] = _or_range(lambda: reversal_error(build(name, n, channels, exact=True), x)["unit0"])
    return row


def _or_range(measure):
    """The measurement, or "range" where the fixed-point state leaves its range (ValueError)."""
    try:
        return measure()
    except ValueError as e:
        if "fixed-point range" not in str(e):
            raise
        return "range"


def stored_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors one forward keeps for the backward."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.nbytes
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(seen.values())


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=False)
    t = time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - t


def grad_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def gradient_row(name: str, n: int, channels: int, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    ref = build(name, n, channels, torch.float64, memory_efficient=False)
    step(ref, x.double(), y)
    g64 = grad_vector(ref)
    models = {"plain": build(name, n, channels, memory_efficient=False), "reversible": build(name, n, channels),
              "segment": build(name, n, channels, segment="auto"), "exact": build(name, n, channels, exact=True)}
    if _or_range(lambda: step(models["exact"], x, y)) == "range":
        del models["exact"]
    times = {k: [] for k in models}
    for i in range(repeats + 1):  # interleaved, the first round warms up (and lets "auto" choose k)
        for k, model in models.items():
            dt = step(model, x, y)
            if i:
                times[k].append(dt)
    choice = models["segment"].units[0].segment.choice
    row = dict(scheme=name.split("-")[0], N=n, k="inf" if choice.k is None else choice.k,
               **{f"{c} exact": "range" for c in ("err", "KB", "ms")})
    for k, model in models.items():
        row[f"err {k}"] = ((grad_vector(model) - g64).norm() / g64.norm()).item()
        row[f"KB {k}"] = stored_bytes(model, x, y) / 1024
        row[f"ms {k}"] = 1e3 * statistics.median(times[k])
    return row


def digits(seed: int = 0):
    """scikit-learn's 1,797 8x8 digits, standardised, split 1,500 train / 297 test."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def training_rows(epochs: int, seeds: list[int]) -> list[dict]:
    rows = []
    for seed in seeds:
        xtr, ytr, xte, yte = digits(seed)
        for exact in (False, True):
            torch.manual_seed(seed)
            model = revnets.build_model("hamiltonian-74", in_channels=1, units=(6, 6), channels=(16, 32), exact=exact)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            gen = torch.Generator().manual_seed(seed)
            t = time.perf_counter()
            for _ in range(epochs):
                model.train()
                for idx in torch.randperm(len(ytr), generator=gen).split(64):
                    train_step(model, opt, xtr[idx], ytr[idx])  # revnets train's step
            seconds = (time.perf_counter() - t) / epochs
            model.eval()
            with torch.no_grad():
                acc = (model(xte).argmax(1) == yte).float().mean().item()
            rows.append(dict(seed=seed, path="exact" if exact else "float32", epochs=epochs,
                             test_acc=f"{100 * acc:.1f}", s_per_epoch=seconds))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--depths", type=int, nargs="+", default=[100, 400, 1000])
    p.add_argument("--max-gradient-depth", type=int, default=1000,
                   help="table 2 only for N up to this (its float64 reference and timed steps dominate the run time)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    drift, grads = [], []
    for scheme in args.schemes:
        for n in args.depths:
            drift.append(drift_row(SCHEMES[scheme], n, args.channels, x))
            print(drift[-1], flush=True)
            if n <= args.max_gradient_depth:
                grads.append(gradient_row(SCHEMES[scheme], n, args.channels, x, y, args.repeats))
                print(grads[-1], flush=True)
    modes = ("plain", "reversible", "segment", "exact")
    tables = [markdown(drift, ["scheme", "N", "float64", "float32", "bf16", "exact"])]
    notes = [f"One unit of N blocks at {args.channels} channels, batch {args.batch}, {args.size}x{args.size} inputs, "
             "default weights. Reversal error of the chain's input (float64/float32/bf16: the whole model in that "
             "dtype; exact: int64 state with 32 fraction bits; range: the state left the fixed-point range "
             "|x| < 2^30 and exact mode refused to run)."]
    if grads:
        tables.append(markdown(grads, ["scheme", "N", "k", *(f"err {m}" for m in modes),
                                       *(f"KB {m}" for m in modes), *(f"ms {m}" for m in modes)]))
        notes.append("Gradients (float32): error against float64 plain autograd; k: segment length chosen by "
                     "segment='auto' (tolerance 1e-5, inf = pure reversal); KB: saved tensors kept for the backward "
                     f"(whole model); ms: one training step, median of {args.repeats} after a warm-up round (in which "
                     "'auto' measured; it re-measures every 50 steps).")
    if args.epochs:
        tables.append(markdown(training_rows(args.epochs, args.seeds),
                               ["seed", "path", "epochs", "test_acc", "s_per_epoch"]))
        notes.append("Training: hamiltonian units=(6, 6), channels=(16, 32) on scikit-learn digits (1,500 train / "
                     "297 test), SGD lr 0.05, momentum 0.9, batch 64, float32 engine vs exact=True from the same "
                     "weights and batches.")
    text = "\n\n".join(tables)
    print(text)
    if args.record:
        record("Reversal drift, segment storage and exact reversal", "cpu", text, " ".join(notes))


if __name__ == "__main__":
    main()
