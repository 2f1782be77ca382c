"""FSDP2 per block (two gloo processes on the CPU): the engine gathers each block's parameters while
it runs, forward and in the backward's recomputation, so that gradients equal single-process plain
autograd's; and `revnets train --fsdp` under torchrun, killed and resumed, its checkpoints loading
anywhere."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import revnets
from revnets import checkpoint
from revnets.inference import logits
from revnets.networks import smoothness_penalty
from revnets.training import distributed

from helpers import relative_error

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS = [name for name, r in revnets.SCHEMES.items() if r.layer is not None]
TEXT_CASES = {f"transformer-{s}": dict(scheme=s) for s in TRANSFORMERS} | {
    "transformer-leapfrog-plain": dict(scheme="leapfrog", memory_efficient=False),
    "transformer-hamiltonian-segment": dict(scheme="hamiltonian", segment=2),
    "transformer-midpoint-dropout": dict(scheme="midpoint", dropout=0.2)}
STACK_CASES = {f"stack-{s}-dim{d}": dict(scheme=s, dim=d) for d in (0, 1, 2, 3) for s in ("hamiltonian", "leapfrog")}
IMAGE_CASES = {"network-hamiltonian": "hamiltonian-74", "network-revnet": "revnet-38", "network-resnet": "resnet-32"}
HF_CASES = {"hf-llama-leapfrog": "leapfrog", "hf-llama-hamiltonian": "hamiltonian"}  # revnets.hf's conversions
COMPILED = ("whole", "per-block")
SPATIAL = {0: (), 1: (6,), 2: (4, 4), 3: (3, 3, 3)}


def build(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if case in HF_CASES:
        from transformers import LlamaConfig, LlamaForCausalLM
        from revnets.hf import reversible
        return reversible(LlamaForCausalLM(LlamaConfig(
            vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8)), HF_CASES[case])
    if case in TEXT_CASES:
        return revnets.ReversibleTransformer(11, 16, 4, 2, 8, **TEXT_CASES[case])
    if case in STACK_CASES:
        kw = STACK_CASES[case]
        return revnets.ReversibleStack(kw["scheme"], 4, 4, dim=kw["dim"], norm=None)
    return revnets.build_model(IMAGE_CASES[case], units=(2, 2), channels=(8, 8), norm=None, num_classes=5)


def batch(case: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    if case in TEXT_CASES or case in HF_CASES:
        x = torch.randint(0, 11, (4, 8), generator=g)
        return x, x.roll(-1, 1)
    if case in STACK_CASES:
        return torch.randn(4, 4, *SPATIAL[STACK_CASES[case]["dim"]], generator=g, dtype=torch.float64), None
    return torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g)


def loss(model, x, y):
    """Cross-entropy (plus Eq. (22)'s smoothness penalty, with sharded kernels under FSDP, for image
    networks) or a squared output."""
    out = logits(model(x))
    if y is None:
        return (out.pow(2).sum() + out.sum()) / len(x)
    penalty = 0.1 * smoothness_penalty(model) if isinstance(model, revnets.Network) else 0
    return F.cross_entropy(out.flatten(0, -2), y.flatten()) + penalty


def _worker(rank, world, store, cases, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grads = {}
    for case in cases:
        model = distributed.shard(build(case).double())
        x, y = batch(case)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        torch.manual_seed(5)  # the same dropout masks as the reference's first shard (rank 0) or second
        loss(model, x[shard], None if y is None else y[shard]).backward()
        grads[case] = [p.grad.full_tensor() for p in model.parameters()]
    for mode in COMPILED:  # torch.compile (aot_eager) of the sharded model, or of each sharded block
        model = distributed.shard(build("transformer-midpoint-dropout").double())
        if mode == "whole":
            model = torch.compile(model, backend="aot_eager")
        else:
            for block in model.blocks:
                block.compile(backend="aot_eager")
        x, y = batch("transformer-midpoint-dropout")
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        for _ in range(2):  # the second step runs the compiled graphs
            model.zero_grad()
            torch.manual_seed(5)
            loss(model, x[shard], y[shard]).backward()
        grads[f"compiled-{mode}"] = [p.grad.full_tensor() for p in model.parameters()]
    for memory_efficient in (True, False):  # bf16 parameters and float32 reduction (MixedPrecisionPolicy)
        model = distributed.shard(build("transformer-leapfrog").float(), amp="bf16")
        model.memory_efficient = memory_efficient
        x, y = batch("transformer-leapfrog")
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss(model, x[shard], y[shard]).backward()
        grads[f"bf16-{memory_efficient}"] = [p.grad.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_grads(tmp_path_factory):
    """Every case's parameter gradients from two processes, each block and the root sharded."""
    tmp = tmp_path_factory.mktemp("fsdp")
    cases = [*TEXT_CASES, *STACK_CASES, *IMAGE_CASES, *HF_CASES]
    mp.start_processes(_worker, args=(2, tmp / "store", cases, tmp / "grads.pt"), nprocs=2, start_method="spawn")
    return torch.load(tmp / "grads.pt")


def _reference(case: str) -> torch.Tensor:
    """Single-process plain autograd: the mean of the two shards' gradients (what FSDP averages), each
    shard with the random numbers its process drew."""
    model = build(case).double()
    model.memory_efficient = False if any(True for _ in revnets.networks.chains(model)) else model.memory_efficient
    x, y = batch(case)
    for shard in (slice(0, 2), slice(2, 4)):
        torch.manual_seed(5)
        (loss(model, x[shard], None if y is None else y[shard]) / 2).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("case", [*TEXT_CASES, *STACK_CASES, *IMAGE_CASES, *HF_CASES])
def test_per_block_fsdp_gradients_equal_single_process_plain_autograd(sharded_grads, case):
    got = torch.cat([g.flatten() for g in sharded_grads[case]])
    assert relative_error(got, _reference(case)) < 1e-9


@pytest.mark.parametrize("mode", COMPILED)
def test_compiled_sharded_models_give_single_process_plain_autograd_gradients(sharded_grads, mode):
    got = torch.cat([g.flatten() for g in sharded_grads[f"compiled-{mode}"]])
    assert relative_error(got, _reference("transformer-midpoint-dropout")) < 1e-9


def test_bf16_parameters_give_gradients_as_accurate_as_plain_autograd_with_them(sharded_grads):
    """FSDP's MixedPrecisionPolicy (bf16 parameters, float32 reduction): the engine's gradients are as
    close to float64 plain autograd's as plain autograd's under the same policy."""
    want = _reference("transformer-leapfrog")
    err = {me: relative_error(torch.cat([g.double().flatten() for g in sharded_grads[f"bf16-{me}"]]), want)
           for me in (True, False)}
    assert err[True] <= 1.5 * err[False] and err[False] < 0.1, err


# ---- revnets train --fsdp under torchrun --------------------------------------------------------

TEXT = str(ROOT / "tests" / "data" / "tiny.txt")
RUN = ["--dataset=text", f"--data-dir={TEXT}", "--model=leapfrog-lm-tiny", "--context=16", "--batch-size=4",
       "--steps-per-epoch=3", "--dropout=0.1", "--seed=2"]


def _torchrun(*argv, check=True):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "revnets.cli", "train", *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(run):
    return checkpoint.load(run / "last.pt")["model"]


def test_a_sharded_text_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _torchrun(*RUN, "--epochs=3", "--fsdp", f"--out={whole}")
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "-m", "revnets.cli", "train", *RUN, "--epochs=3", "--fsdp", f"--out={cut}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not (cut / "last.pt").exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # kill -9 of torchrun and both workers, after epoch 1 or later
    child.wait()
    _torchrun("--resume", str(cut), "--fsdp")
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = checkpoint.load(whole / "best.pt")
    assert not any(hasattr(t, "to_local") for t in ckpt["model"].values())  # full tensors, not shards
    model = revnets.load(whole / "best.pt")  # in this single process
    assert model.generate("And", 10, temperature=0).startswith("And")
    from revnets.cli import main
    assert main(["generate", "--checkpoint", str(whole / "best.pt"), "--prompt", "And", "--tokens", "5"]) == 0


def test_a_sharded_runs_checkpoint_resumes_in_a_single_process_with_its_optimiser_state(tmp_path):
    run = tmp_path / "run"
    _torchrun(*RUN, "--epochs=1", "--schedule=step", "--fsdp", f"--out={run}")
    before = checkpoint.load(run / "last.pt")
    assert set(before["optimizer"]["state"]) >= {"tok.weight", "blocks.0.attn.qkv.weight"}  # full, by name
    from revnets.cli import main
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    from revnets.cli.train import parse_config
    from revnets.training import Run
    resumed = Run(parse_config(["--resume", str(run)]))
    exp_avg = resumed.opt.state[resumed.net.tok.weight]["exp_avg"]
    assert exp_avg.shape == resumed.net.tok.weight.shape and checkpoint.load(run / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--fsdp"], "--fsdp shards the model over the processes of torchrun"),
])
def test_fsdp_without_torchrun_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    from revnets.cli import main
    assert main(["train", *RUN, *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_fsdp_with_exact_reversal_exits_2_before_anything_is_written(tmp_path):
    done = _torchrun(*RUN, "--epochs=1", "--fsdp", "--exact", f"--out={tmp_path / 'run'}", check=False)
    assert done.returncode != 0 and "--fsdp cannot shard a run with --exact" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_sharded_image_run_trains_with_the_smoothness_penalty_and_its_checkpoint_evaluates(tmp_path):
    """Image runs add Eq. (22)'s penalty (default 2e-4), computed from the shards' whole kernels."""
    run = tmp_path / "run"
    _torchrun("--dataset=digits", "--model=hamiltonian-74", "--units", "2", "2", "2", "--channels", "8", "16", "32",
              "--batch-size=200", "--epochs=1", "--smoothness=1e-2", "--fsdp", f"--out={run}")
    from revnets.cli import main
    assert checkpoint.load(run / "last.pt")["epoch"] == 1
    assert main(["eval", "--checkpoint", str(run / "best.pt")]) == 0
