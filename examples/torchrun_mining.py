"""Metric learning on P ranks with DDP and `DistributedLossWrapper`, checked against one process.

Each rank embeds its slice of a synthetic labelled batch (P·K classes, samples around class centres)
with a small MLP under DDP; the Multi-Similarity loss with a Multi-Similarity miner is computed over
the whole gathered batch. Rank 0 replays the same steps in one process on the concatenated batches
and prints the largest parameter difference (fp64: ~1e-15).

    PYTHONPATH=python torchrun --nproc-per-node 2 examples/torchrun_mining.py [--steps 20] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fusedtrain.mining import DistributedLossWrapper, MultiSimilarityLoss, MultiSimilarityMiner


def global_batch(step: int, batch: int, classes: int, d_in: int, centres: torch.Tensor):
    """The whole batch of a step (every rank builds it from the same seed and keeps its slice)."""
    g = torch.Generator().manual_seed(1000 + step)
    labels = torch.randint(0, classes, (batch,), generator=g)
    x = centres[labels] + 0.7 * torch.randn(batch, d_in, generator=g, dtype=centres.dtype)
    return x, labels


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-per-rank", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if args.device == "cuda" else "cpu")
    d_in, d, classes, B = 16, 8, 4 * P, args.batch_per_rank * P
    torch.manual_seed(0)
    centres = torch.randn(classes, d_in, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, 32), torch.nn.ReLU(), torch.nn.Linear(32, d)).double()
    single = copy.deepcopy(model)  # rank 0's single-process replay
    ddp = DDP(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss_fn = DistributedLossWrapper(MultiSimilarityLoss(), miner=MultiSimilarityMiner(0.1))
    rows = slice(rank * args.batch_per_rank, (rank + 1) * args.batch_per_rank)
    for step in range(args.steps):
        x, labels = global_batch(step, B, classes, d_in, centres)
        opt.zero_grad()
        loss = loss_fn(ddp(x[rows].to(device)), labels[rows].to(device))
        loss.backward()
        opt.step()
        logged = loss.detach().clone()
        dist.all_reduce(logged)  # the mean over ranks of the returned losses is the whole batch's loss
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {logged.item() / P:.6f}")
    if rank == 0:
        opt1 = torch.optim.SGD(single.parameters(), lr=0.1)
        loss1, miner1 = MultiSimilarityLoss(), MultiSimilarityMiner(0.1)
        for step in range(args.steps):
            x, labels = global_batch(step, B, classes, d_in, centres)
            opt1.zero_grad()
            emb = single(x)
            loss1(emb, labels, miner1(emb, labels)).backward()
            opt1.step()
        diff = max((a.detach().cpu() - b.detach()).abs().max().item()
                   for a, b in zip(ddp.module.parameters(), single.parameters()))
        print(f"{P} ranks vs one process on the concatenated batch: max |parameter difference| = {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
