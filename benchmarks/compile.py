"""torch.compile and the reversible engine: step times, eager and compiled, and what remains of the gap.

    OMP_NUM_THREADS=1 python benchmarks/compile.py             # CPU: 17 minutes of one core
    OMP_NUM_THREADS=1 python benchmarks/compile.py --record    # also append the tables to BENCHMARKS.md
    python benchmarks/compile.py --device cuda --record        # the GPU rows

Comparisons of a baseline and other models, each eager and compiled (`torch.compile`, inductor,
which the engine also compiles the residual functions with: revnets.engine):
  * transformer, at each of `--depths` (default 12 and 48): the residual (pre-norm, GPT-2) model
    against every reversible transformer scheme (`SCHEMES`: hamiltonian, midpoint, leapfrog,
    revnet), width 56, 4 heads, context 64, the standard MLP, vocabulary 80, batch 32 (`LM`,
    `LM_BATCH`), one step of next-token cross-entropy;
  * image unit: one unit of `--blocks` (default 100) `hamiltonian-74` blocks at 32 channels, 32x32
    inputs, batch 8 (benchmarks/step_time.py's CPU setting, reduced), with plain autograd (the
    baseline), with `torch.utils.checkpoint` per block (use_reentrant=False; common.Checkpointed) and
    reversible (the engine).

Step time, per model: the first step's wall time (compilation, inductor's on-disk cache emptied
first), the graphs compiled in it, the recompiles in the steps after it, and the best and the
median of `--rounds` steps, the steps of all models of a comparison, eager and compiled,
interleaved and timed by the process's CPU time (one thread; other jobs on a shared machine only
add time, so the best is the closest to the step's own cost, as `timeit` takes it; on a GPU, wall
time with synchronisation). Ratios compare each model with the baseline of the same mode, and each
compiled model with its eager self.

What remains of the gap: (1) the floor, per block of the middle of the chain, without the engine:
the baseline block's forward and backward against what the engine computes of a block of each
reversible model, each coupling's residual function once without grad (the forward) and once with
grad, back-propagated (the recomputation); (2) a profile of `--profile-steps` steps of the models in
`PROFILED` (every image model; of the transformers, the residual model and Leapfrog alone, to keep the
run short): self CPU time per step by kind of work (matrix products and convolutions, attention,
inductor's generated kernels, other aten operators, the engine's own Python, the rest).

Time, CPU, one core: 17 minutes (2026-12-07, BENCHMARKS.md), most of it compiling the baselines at
depth 48 and at 100 blocks, whose whole graphs inductor compiles (68 s to 219 s a first step).
"""
import argparse
import os
import statistics
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold compiles, before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import build, interleaved, markdown, record, train_step  # noqa: E402
from revnets import SCHEMES, Network, ReversibleTransformer  # noqa: E402
from revnets.engine import chain_steps, compiled_steps  # noqa: E402

LM = dict(vocab_size=80, width=56, heads=4, context=64)
LM_BATCH, IMAGE = 32, dict(channels=32, size=32, batch=8)
REVERSIBLE = [n for n, r in SCHEMES.items() if r.reversible and r.layer is not None]  # the transformer schemes
PROFILED = ("residual", "leapfrog", "plain", "checkpoint", "reversible")
COLUMNS = ["comparison", "model", "mode", "best_ms", "median_ms", "vs_baseline", "vs_baseline_median", "vs_eager",
           "first_step_s", "graphs", "recompiles"]


def transformer(depth: int, device: str):
    """The models (baseline first), their training step and the state a block of the chain reads."""
    def lm(scheme):
        torch.manual_seed(0)
        return ReversibleTransformer(**LM, depth=depth, scheme=scheme).to(device)
    x = torch.randint(0, LM["vocab_size"], (LM_BATCH, LM["context"] + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    state = (torch.randn(LM_BATCH, LM["context"], LM["width"], device=device),)
    return ({"residual": lm("resnet"), **{scheme: lm(scheme) for scheme in REVERSIBLE}},
            lambda model: F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward(), state)


def image_unit(blocks: int, device: str):
    shape = dict(units=(blocks,), channels=(IMAGE["channels"],))
    models = {mode: build("hamiltonian-74", mode, **shape).to(device) for mode in ("plain", "checkpoint", "reversible")}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(IMAGE["batch"], 3, IMAGE["size"], IMAGE["size"], generator=gen).to(device)
    y = torch.randint(0, 10, (IMAGE["batch"],), generator=gen).to(device)
    half = (IMAGE["batch"], IMAGE["channels"] // 2, IMAGE["size"], IMAGE["size"])
    return models, lambda model: train_step(model, x, y, None), tuple(torch.randn(half, device=device) for _ in "ab")


class Own(torch.nn.Module):
    """A model in a module of its own. Dynamo keeps compiled code per code object: the reversible
    image network's graph break at its chain leaves its `Network.forward` entry guarded only up to
    the unit, and a plain `Network` compiled in the same process would then run that piecewise code
    instead of its own whole graph. The models without the engine (plain, checkpointed, residual)
    are compiled through `Own`: whole graphs, which guard on all they read."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)


def synchronize(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def counted(runs: dict, rounds: int, device: str, counter) -> dict:
    """common.interleaved's times in ms of the runs, and per run the graphs compiled during its calls."""
    graphs = dict.fromkeys(runs, 0)

    def call(key, run):
        def once():
            before = counter.frame_count
            run()
            graphs[key] += counter.frame_count - before
        return once
    seconds = interleaved({key: call(key, run) for key, run in runs.items()}, rounds, device)
    return dict(ms={key: [1e3 * t for t in ts] for key, ts in seconds.items()}, graphs=graphs)


def step_times(comparison: str, models: dict, step, device: str, rounds: int, counter) -> tuple[list[dict], dict]:
    """Rows of one comparison (its baseline the first model), and the compiled and eager models."""
    baseline, runs, first = next(iter(models)), {}, {}
    for name, model in models.items():
        runs[name, "eager"] = model
        runs[name, "compiled"] = torch.compile(model if model.memory_efficient else Own(model))
        for mode in ("eager", "compiled"):
            before, t = counter.frame_count, time.perf_counter()
            step(runs[name, mode])
            synchronize(device)()
            first[name, mode] = (time.perf_counter() - t, counter.frame_count - before)

    def run(model):
        def once():
            model.zero_grad(set_to_none=False)
            step(model)
        return once
    found = counted({key: run(m) for key, m in runs.items()}, rounds, device, counter)
    rows = []
    for (name, mode), ms in found["ms"].items():
        base, eager = found["ms"][baseline, mode], found["ms"][name, "eager"]
        rows.append(dict(comparison=comparison, model=name, mode=mode, best_ms=min(ms), median_ms=statistics.median(ms),
                         vs_baseline=f"{min(ms) / min(base):.2f}",
                         vs_baseline_median=f"{statistics.median(ms) / statistics.median(base):.2f}",
                         vs_eager=f"{min(ms) / min(eager):.2f}", first_step_s=first[name, mode][0],
                         graphs=first[name, mode][1], recompiles=found["graphs"][name, mode]))
    return rows, runs


def middle_block(model: torch.nn.Module) -> torch.nn.Module:
    blocks = model.units[0].blocks if isinstance(model, Network) else model.blocks
    return blocks[len(blocks) // 2]


def floor(comparison: str, models: dict, state: tuple, device: str, rounds: int, counter) -> list[dict]:
    """The baseline block's forward and backward, and the work in the engine of a block of each
    reversible model, without the engine (module docstring), eager and compiled."""
    baseline = middle_block(next(iter(models.values())))
    reversible = {name: middle_block(m) for name, m in models.items() if m.memory_efficient}

    def block_step(block):
        def once():
            inputs = [s.detach().requires_grad_() for s in state]
            out = block(*inputs)
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.grad(out, [*inputs, *baseline.parameters()], [torch.ones_like(o) for o in out])
        return once

    def couplings(block, steps):
        def once():
            b = state[-1]
            for coupling, _ in steps:
                with torch.no_grad():
                    coupling.update(b)
                x = b.detach().requires_grad_()
                u = coupling.update(x)
                torch.autograd.grad(u, [x, *block.parameters()], torch.ones_like(u), allow_unused=True)
        return once
    runs = {("baseline", "eager"): block_step(baseline), ("baseline", "compiled"): block_step(torch.compile(baseline))}
    for name, block in reversible.items():
        steps = chain_steps([block], None)
        runs[name, "eager"], runs[name, "compiled"] = couplings(block, steps), couplings(block, compiled_steps(steps))
    ms = counted(runs, 3 * rounds, device, counter)["ms"]
    return [dict(comparison=comparison, model=name, mode=mode, baseline_block_ms=min(ms["baseline", mode]),
                 reversible_block_ms=min(ms[name, mode]),
                 floor=f"{min(ms[name, mode]) / min(ms['baseline', mode]):.2f}")
            for name in reversible for mode in ("eager", "compiled")]


KINDS = {  # kind of work -> whether a profiler event's name belongs to it (the first kind that claims it)
    "matrix products, convolutions": lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    or n.startswith("aten::") and "conv" in n,
    "attention kernels": lambda n: "scaled_dot_product" in n,
    "inductor's generated kernels": lambda n: n.startswith("## Call CompiledFxGraph"),
    "other aten operators": lambda n: n.startswith("aten::"),
    "the engine's Python": lambda n: n in ("_Reversible", "_ReversibleBackward"),
}


def profile_kinds(model, step, steps: int) -> dict[str, float]:
    """Self CPU ms per step by kind of work; what no kind claims (autograd's engine, dynamo's
    guards, Python around the kernels) is "everything else"."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model)
    by_kind = dict.fromkeys([*KINDS, "everything else"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, claims in KINDS.items() if claims(event.key)), "everything else")
        by_kind[kind] += event.self_cpu_time_total / 1e3 / steps
    return by_kind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[12, 48], help="transformer depths")
    p.add_argument("--blocks", type=int, default=100, help="blocks of the image unit")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    counter = CompileCounterWithBackend("inductor")
    torch.compiler.set_default_backend(counter)  # the engine compiles the residual functions with it too
    comparisons = {f"transformer, depth {d}": transformer(d, args.device) for d in args.depths}
    comparisons[f"image unit, {args.blocks} blocks"] = image_unit(args.blocks, args.device)
    rows, floors, profiles = [], [], []
    for comparison, (models, step, state) in comparisons.items():
        found, runs = step_times(comparison, models, step, args.device, args.rounds, counter)
        rows += found
        found_floor = floor(comparison, models, state, args.device, args.rounds, counter)
        floors += found_floor
        kinds = {f"{name}, {mode}": profile_kinds(model, step, args.profile_steps)
                 for (name, mode), model in runs.items() if name in PROFILED}
        by_kind = [dict(kind=kind, **{m: k[kind] for m, k in kinds.items()}) for kind in [*KINDS, "everything else"]]
        by_kind.append(dict(kind="total", **{m: sum(k.values()) for m, k in kinds.items()}))
        profiles.append(f"Profile, {comparison}: self CPU ms per step\n\n" + markdown(by_kind, ["kind", *kinds]))
        print("\n\n".join([markdown(found, COLUMNS), markdown(found_floor, list(found_floor[0])), profiles[-1]]),
              end="\n\n", flush=True)
    tables = "\n\n".join([markdown(rows, COLUMNS), markdown(floors, list(floors[0])), *profiles])
    if args.record:
        record("torch.compile: step times, the floor, what remains of the gap", args.device, tables,
               f"Transformer: {LM}, batch {LM_BATCH}, the residual model (baseline) and the reversible schemes "
               f"{', '.join(REVERSIBLE)}; image unit: {IMAGE}, Hamiltonian blocks (hamiltonian-74, h = 0.1, "
               "BatchNorm), plain autograd (baseline), torch.utils.checkpoint per block (use_reentrant=False) and "
               f"reversible. Step time: best and median of {args.rounds} steps after two, all models of a comparison "
               "interleaved, by "
               f"{'wall time' if args.device.startswith('cuda') else 'process CPU time'}; vs_baseline: over the "
               "baseline in the same mode (best; and median), vs_eager: compiled over eager, same model. "
               "first_step_s: wall time of the first step (a cold compile; the reversible models' graphs, one per "
               "block class and grad mode, are shared across depths, so a later depth compiles none); graphs: "
               "compiled in it; recompiles: "
               f"graphs compiled in the {args.rounds + 1} steps after it. Floor: one block of the middle of the chain, "
               f"each reversible model's against the baseline's, best of {3 * args.rounds} (module docstring). Profile "
               "(the residual and Leapfrog transformers; every image model): self CPU time per step (ms) under "
               f"torch.profiler over {args.profile_steps} steps, by kind of work.")


if __name__ == "__main__":
    main()
