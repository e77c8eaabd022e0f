"""The fused Z-loss head across ranks: a vocab-parallel SphericalHead (its weight a DTensor placed
Shard(0), the classes split over the ranks) and the same head under FSDP2's fully_shard, each checked
against the single-process head on the whole problem. docs/distributed.md.

    PYTHONPATH=python torchrun --nproc-per-node 2 examples/torchrun_spherical.py     # CPU, gloo
    PYTHONPATH=python torchrun --nproc-per-node 8 examples/torchrun_spherical.py     # GPUs, NCCL

A toy classification task (a fixed random linear teacher) with a two-layer trunk replicated on every
rank. Vocab parallel: every rank sees the same batch; each holds D/P classes of the head, and one
all-reduce of N x 2 numbers gives every rank the loss of the whole head (no N x D/P logits). FSDP2:
each rank its share of the batch, the head's parameters sharded between steps and gathered for its
forward. Rank 0 prints the loss and the largest difference from the single-process run. A few
seconds on 2 CPU cores.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import fusedtrain


def make_model(d_in: int, d: int, classes: int) -> torch.nn.ModuleDict:
    torch.manual_seed(0)  # the same initial model on every rank and in the single-process run
    trunk = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.GELU(), torch.nn.Linear(d, d))
    return torch.nn.ModuleDict(dict(trunk=trunk, head=fusedtrain.nn.SphericalHead(d, classes, kind="z")))


def batches(steps: int, n: int, d_in: int, classes: int):
    g = torch.Generator().manual_seed(1)  # the same data on every rank
    teacher = torch.randn(classes, d_in, generator=g)
    for _ in range(steps):
        x = torch.randn(n, d_in, generator=g)
        yield x, (x @ teacher.t()).argmax(-1)


def train(model, data, rows=slice(None), fsdp_world: int = 1) -> list[float]:
    """SGD steps; the loss of the whole batch at each step (averaged over ranks under FSDP2)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for x, y in data:
        loss = model["head"](model["trunk"](x[rows]), y[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if fsdp_world > 1:  # each rank has the mean over its rows (equal shares of the batch)
            dist.all_reduce(loss)
            loss /= fsdp_world
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="rows per step (a multiple of the world size)")
    parser.add_argument("--classes", type=int, default=1001, help="uneven over most world sizes, on purpose")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_default_dtype(torch.float64)  # so that "equal" can be read at 1e-12, not at fp32 rounding
    torch.set_default_device(device)
    mesh = init_device_mesh(device.type, (world,))
    d_in, d = 32, 48

    single = train(make_model(d_in, d, args.classes), batches(args.steps, args.batch, d_in, args.classes))

    model = make_model(d_in, d, args.classes)  # vocab parallel: the head's classes split over the ranks
    head = model["head"]
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
    head.bias = torch.nn.Parameter(distribute_tensor(head.bias.detach(), mesh, [Shard(0)]))
    vocab_parallel = train(model, batches(args.steps, args.batch, d_in, args.classes))

    model = make_model(d_in, d, args.classes)  # FSDP2: each rank a share of the batch
    for part in ("trunk", "head"):  # FSDP averages the gradients of both over the ranks
        fully_shard(model[part], mesh=mesh)
    share = args.batch // world
    fsdp = train(model, batches(args.steps, args.batch, d_in, args.classes),
                 rows=slice(rank * share, (rank + 1) * share), fsdp_world=world)

    if rank == 0:
        print(f"{world} ranks, {args.classes} classes ({args.classes // world}+ per rank), {args.steps} steps")
        print(f"loss: first {single[0]:.6f}, last {single[-1]:.6f} (single process)")
        for name, losses in (("vocab parallel", vocab_parallel), ("fully_shard", fsdp)):
            diff = max(abs(a - b) / abs(b) for a, b in zip(losses, single))
            print(f"{name:>15}: last {losses[-1]:.6f}, largest relative difference from single process {diff:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
