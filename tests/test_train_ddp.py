"""`revnets train` under DistributedDataParallel: two gloo processes, one step, a reversible model (an
image run, and a text run started by torchrun as users start it)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from revnets import checkpoint, inference
from revnets.cli.train import parse_config
from revnets.training import Config, Run, train
from revnets.training.step import totals
from revnets.training.tasks import ImageTask

ARGV = ["--model", "hamiltonian-74", "--units", "2", "2", "2", "--channels", "8", "16", "32", "--epochs", "1",
        "--train-fraction", "0.1", "--batch-size", "200", "--lr", "1", "--weight-decay", "0", "--smoothness", "0",
        "--val-fraction", "0"]


def _worker(rank, world, store, run_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = run_dir if rank == 0 else f"{run_dir}-rank{rank}"  # only rank 0 may write
    train(parse_config([*ARGV, "--out", str(out)]))
    dist.destroy_process_group()


def test_ddp_step_equals_the_average_of_the_shards_gradients(tmp_path):
    run_dir = tmp_path / "run"
    mp.start_processes(_worker, args=(2, tmp_path / "store", run_dir), nprocs=2, start_method="spawn")
    assert not (tmp_path / "run-rank1").exists()
    after = checkpoint.load(run_dir / "last.pt")["model"]

    # Reference in this process: the same initial network, each rank's share of the one global batch
    # (144 images), and the mean of the two shards' gradients (BatchNorm normalises each shard with its
    # own statistics, so this, not the full-batch gradient, is what DDP computes).
    config = parse_config([*ARGV, "--out", str(tmp_path / "ref")])
    tasks = [ImageTask(config, torch.device("cpu"), rank, 2) for rank in range(2)]
    torch.manual_seed(config.seed)
    model = inference.build_network(tasks[0].record(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads, losses, buffers = [], [], []
    for rank in range(2):
        loader = tasks[rank].train_loader
        assert len(loader) == 1
        x, y = next(iter(loader))
        model.load_state_dict(before)
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append({k: p.grad.double() for k, p in model.named_parameters()})
        losses.append(loss.item() * len(y) / 144)
        buffers.append({k: b.clone() for k, b in model.named_buffers()})  # BatchNorm statistics of this shard
    for name, _ in model.named_parameters():
        ddp_grad = (before[name].double() - after[name].double()) / config.lr  # first SGD step: p -= lr * g
        torch.testing.assert_close(ddp_grad, (grads[0][name] + grads[1][name]) / 2, rtol=0, atol=2e-6)
    with open(run_dir / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert abs(float(row["train_loss"]) - sum(losses)) < 1e-5  # metrics are reduced over both processes

    # Each process tests its share of the test split with the checkpoint's weights and BatchNorm
    # statistics (rank 0's; rank 1's own differ: it normalised its own shard); the test metrics are the
    # sums over both shares.
    assert any(not torch.equal(after[k], b) for k, b in buffers[1].items())
    model.load_state_dict(after)
    sums = 0
    for rank in range(2):
        sums = sums + totals(model, tasks[rank].test_loader)
    loss_sum, correct, images = sums.tolist()
    assert images == len(tasks[0].ds.test_y)
    assert abs(float(row["test_loss"]) - loss_sum / images) < 1e-7 and float(row["test_acc"]) == correct / images


def test_text_run_under_torchrun_steps_with_the_mean_of_the_shards_gradients(tmp_path):
    """torchrun, two processes, one AdamW step of a reversible language model with dropout (so the
    engine replays random numbers inside DDP): rank 0 alone writes, and the step is the one the mean
    of the two shards' gradients gives (equal shards: the gradient of the global batch)."""
    tiny = str(Path(__file__).parent / "data" / "tiny.txt")
    flags = dict(data_dir=tiny, model="leapfrog-lm-tiny", context=16, dropout=0.1, batch_size=4, steps_per_epoch=1,
                 epochs=1)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "revnets.cli", "train", "--dataset=text", *argv, f"--out={out}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: validation") == 1  # one process reports and writes
    after = checkpoint.load(out / "last.pt")["model"]

    # Reference in this process, one thread as each worker: the same initial model, optimiser and
    # random-number state (the run's seed), each rank's share of global batch 0 from that state.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Run(Config(dataset="text", **flags, out=str(tmp_path / "ref")))
        start, grads, losses = torch.get_rng_state(), [], []
        for rank in range(2):
            ref.task.rank, ref.task.world = rank, 2
            x, y = ref.task.batch(0)
            torch.set_rng_state(start)
            ref.net.zero_grad()
            loss = F.cross_entropy(ref.net(x).flatten(0, 1), y.flatten())
            loss.backward()
            grads.append([p.grad.clone() for p in ref.net.parameters()])
            losses.append(loss.item())
        for p, g0, g1 in zip(ref.net.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        ref.opt.step()
    finally:
        torch.set_num_threads(threads)
    assert not torch.allclose(*(torch.cat([g.flatten() for g in gs]) for gs in grads))  # two different shards
    for name, w in ref.net.state_dict().items():
        torch.testing.assert_close(after[name], w, rtol=0, atol=1e-6, msg=name)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and abs(float(rows[0]["train_loss"]) - sum(losses) / 2) < 1e-6
