"""`revnets train` under DistributedDataParallel: two gloo processes, one step, a reversible model."""
import csv

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from revnets import checkpoint, loop, train
from revnets.config import parse_config

ARGV = ["--model", "hamiltonian-74", "--units", "2", "2", "2", "--channels", "8", "16", "32", "--epochs", "1",
        "--train-fraction", "0.1", "--batch-size", "200", "--lr", "1", "--weight-decay", "0", "--smoothness", "0",
        "--val-fraction", "0"]


def _worker(rank, world, store, run_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = run_dir if rank == 0 else f"{run_dir}-rank{rank}"  # only rank 0 may write
    train.train(parse_config([*ARGV, "--out", str(out)]))
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
    ds = train.load_data(config)
    model = train.make_model(config, ds, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads, losses, buffers = [], [], []
    for rank in range(2):
        loader = train.loaders(config, ds, torch.device("cpu"), rank, 2)[0]
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
        sums = sums + loop.totals(model, train.loaders(config, ds, torch.device("cpu"), rank, 2)[2])
    loss_sum, correct, images = sums.tolist()
    assert images == len(ds.test_y)
    assert abs(float(row["test_loss"]) - loss_sum / images) < 1e-7 and float(row["test_acc"]) == correct / images
