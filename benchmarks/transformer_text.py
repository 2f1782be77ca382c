"""Language models on the King James Bible at a budget where they learn words: trained from scratch,
converted from a trained residual model, and against per-layer checkpointing.

    OMP_NUM_THREADS=1 nohup python benchmarks/transformer_text.py > kjv.log &  # hours of one core; resumes
    OMP_NUM_THREADS=1 python benchmarks/transformer_text.py --record   # the same, then BENCHMARKS.md
    python benchmarks/transformer_text.py --smoke --out /tmp/smoke     # every part tiny, in seconds (tests)

Text: Debian's `bible-kjv-text` (installed with apt-get when missing; `bible` decodes it), character
level, the last 1% held out (43,000 characters of Revelation: bits per character on all of it
after every 100 steps). Model: a Llama (RMSNorm, rotary positions, SwiGLU MLP, grouped-query
attention; `transformers.LlamaForCausalLM`, 6 layers of width 128, 4 heads, 2 key-value heads,
MLP 352, tied embeddings: 1.12M parameters), made reversible by `revnets.hf` at equal parameters.
Every model trains through `revnets train` (the library's run: AdamW, warm-up and cosine decay),
16 windows of 128 characters a step.

  1. From scratch: the randomly initialised Llama of each seed (saved with `save_pretrained`) trained
     as it is (the residual network) and converted into each scheme (`--convert`, starting at rest)
     for STEPS steps at lr 3e-3; seed 0 for every scheme, seeds 1 and 2 for the residual model and
     the reversible scheme that did best on seed 0.
  2. Conversion: the residual model of seed 0 converted into each scheme (Leapfrog from both starts,
     `--init rest` and `fixed-point`; MidPoint's two starts are one function), its bits per
     character right after conversion, then FINETUNE steps at lr 1e-3 with cross-entropy and with
     distillation (`--distill`), against the residual model trained FINETUNE steps more: the share
     of the conversion's gap each closes.
  3. Memory and time at depths 6, 24 and 96: bytes autograd saves for the backward and the step's
     CPU time (best and median of interleaved steps, one thread) of each scheme against the
     residual model with and without per-layer checkpointing
     (`gradient_checkpointing_enable`, torch.utils.checkpoint).

Runs live in --out (one directory each: a finished run is read, a killed one resumed), so a cut
benchmark goes on where it stopped. Writes docs/figures/transformers.json and the figure
docs/figures/transformers-bpc.png (bits per character against step and against CPU time, the time
axis each scheme's step CPU time at depth 6 from part 3).
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, interleaved, markdown, record

from revnets import checkpoint, inference, memory
from revnets.files import atomic_write, write_json
from revnets.cli.train import parse_config
from revnets.hf import reversible
from revnets.training import train, train_step
from revnets.training.text import bits_per_char, load_text

SCHEMES = ("midpoint", "leapfrog", "hamiltonian", "revnet")
SIZE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
SMOKE = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def kjv(path: Path) -> Path:
    """The KJV as one UTF-8 file at `path`, decoded from the Debian package (installed if missing)."""
    if not path.exists():
        if shutil.which("bible") is None:
            subprocess.run("apt-get update -qq && apt-get install -y -qq bible-kjv-text bible-kjv",
                           shell=True, check=True)
        text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
        atomic_write(path, lambda f: f.write(text), text=True)  # a cut run never leaves half a text
    return path


def llama(vocab: int, context: int, sizes: dict, depth: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM
    sizes = dict(sizes, **({"num_hidden_layers": depth} if depth else {}))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=context, tie_word_embeddings=True,
                                        **sizes))


def source(out: Path, seed: int, vocab: int, context: int, sizes: dict) -> Path:
    """The randomly initialised Llama of `seed`, saved once with save_pretrained."""
    path = out / f"llama-seed{seed}"
    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        llama(vocab, context, sizes).save_pretrained(path)
    return path


def run(out: Path, name: str, flags: list[str]) -> dict:
    """A `revnets train` run in out/name: its summary if it finished, else trained (resumed after a kill)."""
    run_dir = out / name
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    print(f"{name}: revnets train {' '.join(flags)}", flush=True)
    argv = ["--resume", str(run_dir)] if (run_dir / "last.pt").exists() else [*flags, "--out", str(run_dir)]
    return train(parse_config(argv))


def curve(out: Path, name: str) -> list[tuple[int, float]]:
    """(step, validation bits per character) after every epoch of a run."""
    import csv
    with open(out / name / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["val_bpc"])) for r in csv.DictReader(f)]


def from_scratch(args, out: Path, text: Path, vocab: int) -> dict[str, list[str]]:
    """Part 1: {scheme: run names}, "residual" the model as it is."""
    common = ["--dataset", "text", "--data-dir", str(text), "--val-fraction", "0.01", "--batch-size", "16",
              "--steps-per-epoch", str(args.steps_per_epoch), "--epochs", str(args.steps // args.steps_per_epoch),
              "--lr", "3e-3"]

    def scratch(scheme: str, seed: int) -> str:
        name = f"scratch-{scheme}-seed{seed}"
        convert = [] if scheme == "residual" else ["--convert", scheme] + (
            ["--init", "rest"] if scheme in ("midpoint", "leapfrog") else [])
        run(out, name, [*common, "--init-from", str(source(out, seed, vocab, args.context, args.sizes)), *convert,
                        "--seed", str(seed)])
        return name
    runs = {s: [scratch(s, args.seeds[0])] for s in ("residual", *SCHEMES)}
    best = min(SCHEMES, key=lambda s: curve(out, runs[s][0])[-1][1])
    for scheme in ("residual", best):
        runs[scheme] += [scratch(scheme, seed) for seed in args.seeds[1:]]
    return runs


def converted_bpc(path: Path, overrides: dict, data) -> float:
    """Bits per character of the checkpoint's model converted as `overrides` say, before any training."""
    ckpt = checkpoint.load(path)
    rec = inference.record_of(ckpt, path)
    net = inference.build_network({**rec, "overrides": {**rec["overrides"], **overrides}})
    checkpoint.load_state(net, ckpt["model"], path)
    return bits_per_char(net.eval(), data.val, data.tokens_per_char, net.config.max_position_embeddings)


def conversion(args, out: Path, text: Path, data, residual: str) -> list[dict]:
    """Part 2: one row per (scheme, start): bits per character at conversion and after fine-tuning."""
    trained = out / residual / "last.pt"
    common = ["--dataset", "text", "--data-dir", str(text), "--val-fraction", "0.01", "--batch-size", "16",
              "--steps-per-epoch", str(args.finetune), "--epochs", "1", "--lr", "1e-3", "--init-from", str(trained)]
    more = run(out, "finetune-residual", common)["final_bpc"]
    start = curve(out, residual)[-1][1]
    rows = []
    for scheme, init in [("midpoint", "fixed-point"), ("leapfrog", "fixed-point"), ("leapfrog", "rest"),
                         ("hamiltonian", "rest"), ("revnet", "rest")]:
        at_conversion = converted_bpc(trained, dict(scheme=scheme, init=init), data)
        row = dict(scheme=scheme, init=init, residual=start, converted=at_conversion, residual_more=more)
        for method, flags in (("ce", []), ("distill", ["--distill"])):
            name = f"finetune-{scheme}-{init}-{method}"
            row[method] = run(out, name, [*common, "--convert", scheme, "--init", init, *flags])["final_bpc"]
            row[f"{method}_closed"] = 1 - (row[method] - more) / (at_conversion - start)
        rows.append(row)
        print(f"  {scheme} ({init}): {at_conversion:.3f} at conversion, {row['ce']:.3f} cross-entropy, "
              f"{row['distill']:.3f} distillation; residual {start:.3f} -> {more:.3f}", flush=True)
    return rows


def models_at(depth: int, vocab: int, context: int, sizes: dict) -> dict:
    """The residual Llama at `depth`, with per-layer checkpointing, and converted into every scheme."""
    models = {}
    for name in ("residual", "checkpointed", *SCHEMES):
        torch.manual_seed(0)
        model = llama(vocab, context, sizes, depth)
        if name == "checkpointed":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
        models[name] = reversible(model, name, init="rest") if name in SCHEMES else model
    return models


def memory_and_time(args, vocab: int) -> list[dict]:
    """Part 3: saved bytes and step CPU time per model and depth, the models' steps interleaved."""
    x = torch.randint(0, vocab, (16, args.context), generator=torch.Generator().manual_seed(0))
    rows = []
    for depth, rounds in zip(args.depths, args.rounds):
        models = models_at(depth, vocab, args.context, args.sizes)
        opts = {n: torch.optim.AdamW(m.parameters(), 1e-4) for n, m in models.items()}
        times = interleaved({n: (lambda n=n: train_step(models[n].train(), opts[n], x, x.roll(-1, 1)))
                             for n in models}, rounds)
        for n, model in models.items():
            saved = memory.saved_bytes(model, lambda: model(x).logits.sum())[0]
            rows.append(dict(model=n, depth=depth, saved_mb=saved / 2**20, step_s=min(times[n]),
                             median_s=statistics.median(times[n])))
        base = {k: next(r[k] for r in rows if r["depth"] == depth and r["model"] == "residual")
                for k in ("step_s", "median_s")}
        for row in rows[-len(models):]:
            row.update(vs_residual=row["step_s"] / base["step_s"],
                       vs_residual_median=row["median_s"] / base["median_s"])
        line = ", ".join(f"{r['model']} {r['vs_residual']:.2f}x {r['saved_mb']:.1f} MB" for r in rows[-len(models):])
        print(f"  depth {depth}: {line}", flush=True)
    return rows


def figure(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from revnets.files import save_png
    step_s = {r["model"]: r["step_s"] for r in result["memory"] if r["depth"] == result["depth"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for scheme, row in result["scratch"].items():
        steps, bpc = zip(*row["mean_curve"])
        for ax, x in ((axes[0], steps), (axes[1], [s * step_s[scheme] / 60 for s in steps])):
            ax.plot(x, bpc, label=f"{scheme} ({len(row['seeds'])} seed{'s' if len(row['seeds']) > 1 else ''})")
    axes[0].set(xlabel="training step", ylabel="held-out bits per character")
    axes[1].set(xlabel="CPU minutes (one thread, steps x the step's CPU time)")
    for ax in axes:
        ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"King James Bible, characters: a {result['params'] / 1e6:.2f}M-parameter Llama, as it is and "
                 "made reversible")
    save_png(fig, path)


def scratch_table(out: Path, runs: dict) -> dict:
    """Per scheme: final bits per character of each seed, their mean and range, the mean curve."""
    table = {}
    for scheme, names in runs.items():
        curves = [curve(out, n) for n in names]
        finals = [c[-1][1] for c in curves]
        table[scheme] = dict(seeds=finals, mean=statistics.mean(finals), low=min(finals), high=max(finals),
                             mean_curve=[(points[0][0], statistics.mean(b for _, b in points))
                                         for points in zip(*curves)])
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "kjv", help="where the runs live (default: runs/kjv)")
    p.add_argument("--text", type=Path, default=Path("/tmp/kjv.txt"), help="where the decoded KJV is kept")
    p.add_argument("--steps", type=int, default=3000, help="training steps from scratch (default: 3000)")
    p.add_argument("--finetune", type=int, default=300, help="fine-tuning steps after conversion (default: 300)")
    p.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    p.add_argument("--smoke", action="store_true", help="every part tiny, on tests/data/tiny.txt, in seconds")
    args = p.parse_args()
    args.seeds, args.context, args.sizes, args.steps_per_epoch = [0, 1, 2], 128, SIZE, 100
    args.depths, args.rounds = [6, 24, 96], [9, 7, 3]
    if args.smoke:
        text, args.steps, args.finetune, args.steps_per_epoch = ROOT / "tests" / "data" / "tiny.txt", 4, 2, 2
        args.seeds, args.context, args.sizes, args.depths, args.rounds = [0, 1], 16, SMOKE, [2, 4], [1, 1]
    else:
        text = kjv(args.text)
    torch.set_num_threads(1)
    data = load_text(text, "char", val_fraction=0.01)
    vocab = len(data.vocab)
    print(f"text: {len(data.train):,} training / {len(data.val):,} held-out characters, vocabulary {vocab}", flush=True)
    t0 = time.process_time()
    runs = from_scratch(args, args.out, text, vocab)
    scratch = scratch_table(args.out, runs)
    rows = conversion(args, args.out, text, data, runs["residual"][0])
    mem = memory_and_time(args, vocab)
    params = sum(p.numel() for p in llama(vocab, args.context, args.sizes).parameters())
    result = dict(command="OMP_NUM_THREADS=1 python benchmarks/transformer_text.py " + " ".join(sys.argv[1:]),
                  torch=torch.__version__, params=params, steps=args.steps, finetune=args.finetune,
                  depth=args.sizes["num_hidden_layers"], scratch=scratch, conversion=rows, memory=mem,
                  cpu_minutes_this_invocation=(time.process_time() - t0) / 60)
    figures = ROOT / "docs" / "figures" if not args.smoke else args.out
    figures.mkdir(parents=True, exist_ok=True)
    write_json(figures / "transformers.json", result, indent=1)
    figure(result, figures / "transformers-bpc.png")
    scratch_rows = [dict(scheme=s, seeds=len(r["seeds"]), mean_bpc=f"{r['mean']:.3f}",
                         range=f"{r['low']:.3f} to {r['high']:.3f}") for s, r in scratch.items()]
    three = lambda v: f"{v:.3f}" if isinstance(v, float) else v  # noqa: E731
    tables = (markdown(scratch_rows, ["scheme", "seeds", "mean_bpc", "range"]) + "\n\n"
              + markdown([{k: three(v) for k, v in r.items()} for r in rows],
                         ["scheme", "init", "residual", "converted", "ce", "ce_closed", "distill", "distill_closed",
                          "residual_more"]) + "\n\n"
              + markdown([{k: three(v) for k, v in r.items()} for r in mem],
                         ["model", "depth", "saved_mb", "step_s", "vs_residual", "vs_residual_median"]))
    print(tables)
    if args.record:
        record("Language models on the King James Bible: from scratch, converted, against checkpointing", "cpu",
               tables, f"OMP_NUM_THREADS=1; {params:,}-parameter Llama (`revnets.hf`), {args.steps} steps from "
               f"scratch of 16 x {args.context} characters at lr 3e-3, {args.finetune} fine-tuning steps at lr 1e-3; "
               "bits per character on the last 1% of the text; step time: CPU time, best (and median) of interleaved "
               "steps, batch 16. Reading: docs/transformers.md.")


if __name__ == "__main__":
    main()
