"""Per-process memory of a sharded model: FSDP2 per block against DistributedDataParallel on 1, 2 and 4
CPU processes (gloo), and the activations autograd keeps under FSDP against depth.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py            # about two minutes
    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py --record   # also append the tables to BENCHMARKS.md

Model: `leapfrog-lm-base` (width 384, 12 layers, 6 heads, context 256) with a vocabulary of 4,096
tokens, 22.9M parameters, memory-efficient. Each configuration runs in fresh processes: one AdamW
step on 4 windows of 256 tokens per process; then each process counts the bytes it holds of
parameters, gradients and optimiser state (its shards under FSDP: `to_local()`), and the CPU
allocator's peak during the step above what it held before (`revnets.memory.peak_cpu_bytes`:
parameters and optimiser state created before the step are not in it; gathered blocks,
activations and gradients are). Saved activations: bytes autograd keeps for the backward of one
forward under FSDP (2 processes) at depths 12 and 48.
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common import markdown, record

import revnets
from revnets import memory
from revnets.files import write_json
from revnets.training import distributed

VOCAB, BATCH, CONTEXT = 4096, 4, 256


def held_bytes(tensors) -> int:
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors if t is not None)


def _worker(rank, world, store, engine, depth, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = revnets.build_model("leapfrog-lm-base", vocab_size=VOCAB, depth=depth)
    model = distributed.shard(net) if engine == "fsdp" else \
        torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(rank))

    def step():
        F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        opt.step()
    peak = memory.peak_cpu_bytes(step)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    row = dict(engine=engine, processes=world, depth=depth, params_mb=held_bytes(net.parameters()) / 2**20,
               grads_mb=held_bytes(p.grad for p in net.parameters()) / 2**20, optimizer_mb=held_bytes(state) / 2**20,
               step_peak_mb=peak / 2**20, saved_mb=memory.saved_bytes(net, lambda: model(x).sum())[0] / 2**20)
    row["held_mb"] = row["params_mb"] + row["grads_mb"] + row["optimizer_mb"]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        write_json(out, dict(rows=rows, params=sum(p.numel() for p in build_full(depth).parameters())))
    dist.destroy_process_group()


def build_full(depth: int) -> torch.nn.Module:
    with torch.device("meta"):
        return revnets.build_model("leapfrog-lm-base", vocab_size=VOCAB, depth=depth)


def measure(engine: str, world: int, depth: int) -> tuple[dict, int]:
    """The largest process's numbers (they agree up to a shard's rounding) and the parameter count."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, f"{tmp}/store", engine, depth, f"{tmp}/out.json"), nprocs=world,
                           start_method="spawn")
        result = json.loads(Path(tmp, "out.json").read_text())
    return max(result["rows"], key=lambda r: r["held_mb"]), result["params"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 48], help="saved activations against depth")
    args = p.parse_args()
    rows, params = [], None
    for world in args.processes:
        for engine in ("ddp", "fsdp"):
            row, params = measure(engine, world, 12)
            rows.append(row)
            print(row, flush=True)
    depth_rows = [measure("fsdp", 2, depth)[0] for depth in args.depths]
    shown = [{k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    tables = (markdown(shown, ["engine", "processes", "params_mb", "grads_mb", "optimizer_mb", "held_mb",
                               "step_peak_mb"]) + "\n\n"
              + markdown([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in depth_rows],
                         ["engine", "processes", "depth", "saved_mb", "params_mb"]))
    print(f"leapfrog-lm-base, vocabulary {VOCAB}: {params:,} parameters\n{tables}")
    if args.record:
        record("FSDP2 per block against DDP: memory per process", "cpu", tables,
               f"`leapfrog-lm-base` (vocabulary {VOCAB}, {params:,} parameters at depth 12), one AdamW step on "
               f"{BATCH} x {CONTEXT} tokens per process, gloo, one thread per process. held_mb: parameters + "
               "gradients + AdamW state this process holds after the step (its shards under FSDP); step_peak_mb: "
               "the CPU allocator's peak during the step above what was held before it (gathered blocks, "
               "activations, gradients). The largest process of each configuration. Second table: bytes autograd "
               "keeps for the backward of one forward under FSDP, 2 processes.")


if __name__ == "__main__":
    main()
