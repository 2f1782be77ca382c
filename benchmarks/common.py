"""Shared measurement code for the benchmark scripts: one training step, timed and sized.

Each configuration is measured in a fresh child process, so that the peak resident memory on a
CPU (ru_maxrss) and the CUDA allocator's peak belong to that configuration alone.
"""
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import revnets

ROOT = Path(__file__).resolve().parents[1]


class Checkpointed(torch.nn.Module):
    """A block run under torch.utils.checkpoint: the baseline that recomputes without inverting."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, a, b):
        return checkpoint(self.block, a, b, use_reentrant=False)


def build(name: str, mode: str, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """`mode`: 'reversible' (the engine), 'plain' (autograd keeps everything) or 'checkpoint'."""
    torch.manual_seed(0)
    model = revnets.build_model(name, memory_efficient=mode == "reversible", **overrides).to(dtype)
    if mode == "checkpoint":  # each block of each unit's chain (plain autograd) under torch.utils.checkpoint
        for unit in model.units:
            for i, block in enumerate(getattr(unit, "blocks", [])):
                unit.blocks[i] = Checkpointed(block)
    return model


def train_step(model, x, y, amp: str | None) -> None:
    with torch.autocast(x.device.type, dtype=getattr(torch, amp or "float32"), enabled=amp is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()


def grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def measure(name: str, mode: str, batch: int, size: int, device: str, amp: str | None, repeats: int,
            grad_error: bool, **overrides) -> dict:
    """Median step time (ms), peak memory (MB) and gradient error of one configuration (in-process)."""
    model = build(name, mode, **overrides).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=False)
        sync()
        t = time.perf_counter()
        train_step(model, x, y, amp)
        sync()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = dict(model=name, mode=mode, amp=amp or "fp32", ms=1e3 * statistics.median(times[1:]),
               peak_mb=(peak - base) / 2**20,
               param_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
               **{k: str(v) for k, v in overrides.items()})
    if grad_error:
        g = grad_vector(model)
        ref = build(name, "plain", torch.float64, **overrides).to(device)  # same seed: same weights
        train_step(ref, x.double(), y, None)
        g_ref = grad_vector(ref)
        out["grad_err"] = ((g - g_ref).norm() / g_ref.norm()).item()
    return out


def interleaved(calls: dict, rounds: int, device: str = "cpu") -> dict:
    """Per key: the seconds of `rounds` calls of calls[key], all calls interleaved round by round
    after one untimed round, so that a shared machine's changing load falls on every call alike.
    CPU: the process's CPU time (other processes disturb it far less than wall time); GPU: wall
    time, synchronised."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    times = {key: [] for key in calls}
    for r in range(rounds + 1):
        for key, call in calls.items():
            sync()
            t = clock()
            call()
            sync()
            if r:
                times[key].append(clock() - t)
    return times


def measure_interleaved(name: str, modes: list[str], batch: int, size: int, device: str, amp: str | None,
                        repeats: int, **overrides) -> list[dict]:
    """Step time of several modes of one model, their steps interleaved in one process.

    On a shared machine the load changes from second to second; alternating the modes step by
    step gives each the same conditions, so their ratio is fair. On a CPU the time is the
    process's CPU time, which other processes' load disturbs far less than wall-clock time.
    Per mode: median ms, gradient error against a float64 plain-autograd reference, and on a
    GPU the step's peak allocator memory above what was held before it (CPU peak memory needs
    a process per mode: memory_vs_depth.py).
    """
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    models = {mode: build(name, mode, **overrides).to(device) for mode in modes}
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time  # CPU: the process's CPU time (load-robust)
    times, peaks = {m: [] for m in modes}, {m: 0.0 for m in modes}
    for i in range(repeats + 1):
        for mode, model in models.items():
            model.zero_grad(set_to_none=False)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = clock()
            train_step(model, x, y, amp)
            sync()
            if i:  # the first round warms up
                times[mode].append(clock() - t)
            if cuda:
                peaks[mode] = max(peaks[mode], (torch.cuda.max_memory_allocated() - base) / 2**20)
    ref = build(name, "plain", torch.float64, **overrides).to(device)  # same seed: same weights
    train_step(ref, x.double(), y, None)
    g_ref = grad_vector(ref)
    rows = []
    for mode, model in models.items():
        ms = 1e3 * statistics.median(times[mode])
        rows.append(dict(model=name, mode=mode, amp=amp or "fp32", ms=ms,
                         ratio=f"{ms / (1e3 * statistics.median(times[modes[0]])):.2f}",
                         peak_mb=peaks[mode] if cuda else "",
                         grad_err=((grad_vector(model) - g_ref).norm() / g_ref.norm()).item()))
    return rows


def measure_in_child(script: str, config: dict):
    """Run `script --child JSON` in a fresh process and return the JSON it prints."""
    done = subprocess.run([sys.executable, script, "--child", json.dumps(config)], capture_output=True, text=True)
    if done.returncode:
        return dict(config, model=config.get("name"),
                    error=done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads"


def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return (f"{v:,.1f}" if isinstance(v, float) and abs(v) >= 0.1
                else (f"{v:.1e}" if isinstance(v, float) else str(v)))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, device: str, table: str, notes: str = "") -> None:
    """Append a dated section with machine, torch version and command to BENCHMARKS.md."""
    script = Path(sys.argv[0]).resolve()  # from the repository root, wherever the script was started from
    command = "python " + " ".join([str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0],
                                    *sys.argv[1:]])
    section = (f"\n## {title} — {datetime.date.today().isoformat()}\n\n"
               f"Machine: {machine(device)}; torch {torch.__version__}. Command: `{command}`\n\n{table}\n")
    if notes:
        section += f"\n{notes}\n"
    path = ROOT / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nNumbers measured by the scripts in `benchmarks/`; each section names its "
                        "date, machine and command.\n")
    with path.open("a") as f:
        f.write(section)
