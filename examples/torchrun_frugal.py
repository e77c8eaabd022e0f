"""FRUGAL under DDP or FSDP2 with torchrun, on CPUs (gloo) or GPUs (NCCL).

Each rank trains on its own batches of a synthetic regression task, with its own RNG state (as data
loaders leave it) and no `seed=`: FRUGAL agrees on rank 0's seed when it is constructed (a
collective, so every rank constructs it). The script then checks what docs/distributed.md promises:

- ddp:  the replicas are bitwise equal after training;
- fsdp: (`fully_shard`, the step on each rank's shard) a torch.distributed.checkpoint saved halfway
        and loaded into a fresh model and optimizer replays the second half bit for bit.

    PYTHONPATH=python torchrun --nproc-per-node 2 examples/torchrun_frugal.py [--mode fsdp|ddp]
        [--proj columns|rows|block|svd|random] [--steps 40] [--checkpoint DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from fusedtrain.optim import FRUGAL

WIDTH, DEPTH, BATCH = 48, 3, 32


def make_model(mode: str, device: torch.device):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(DEPTH)],
                          nn.Linear(WIDTH, 5)).to(device)
    if mode == "ddp":
        return model, DDP(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model[:DEPTH]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model


def make_optimizer(model, proj: str):
    # Per-rank RNG state: without the shared seed every rank would draw other subspaces.
    torch.manual_seed(1000 + dist.get_rank())
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return FRUGAL([{"params": matrices}, {"params": others}], lr=1e-2, density=0.25, proj=proj, update_gap=10)


def batch(step: int, device):
    """This rank's batch of step `step`: a fixed teacher, inputs drawn per (step, rank)."""
    teacher = torch.randn(WIDTH, 5, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(step * dist.get_world_size() + dist.get_rank())
    x = torch.randn(BATCH, WIDTH, generator=gen)
    return x.to(device), torch.sin(x @ teacher / WIDTH**0.5).to(device)


def train(forward, opt, steps: range, device) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(step, device)
        opt.zero_grad()
        loss = nn.functional.mse_loss(forward(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def parameters(model) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--proj", choices=("columns", "rows", "block", "svd", "random"), default="columns")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint", help="folder for the checkpoint (default: a temporary one)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    say = print if rank == 0 else (lambda *a, **k: None)

    model, forward = make_model(args.mode, device)
    opt = make_optimizer(model, args.proj)
    half = args.steps // 2
    first = train(forward, opt, range(0, half), device)
    folder = (args.checkpoint or tempfile.mkdtemp(prefix="frugal_dcp_")) if rank == 0 else None
    box = [folder]
    dist.broadcast_object_list(box, src=0)
    folder = box[0]
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=folder)
    last = train(forward, opt, range(half, args.steps), device)
    say(f"{args.mode} on {world} ranks ({'nccl' if cuda else 'gloo'}), proj={args.proj}: "
        f"this rank's loss {first[0]:.4f} at step 0, {first[-1]:.4f} at {half - 1}, {last[-1]:.4f} at {args.steps - 1}")
    final = parameters(model)

    if args.mode == "ddp":
        for p in final:  # every rank's replica against rank 0's
            reference = p.clone()
            dist.broadcast(reference, src=0)
            assert torch.equal(p, reference), "DDP replicas drifted apart"
        say("DDP replicas bitwise equal: yes")
    # Resume: a fresh model and optimizer (other RNG state), the checkpoint, the second half again.
    torch.manual_seed(12345)
    model2, forward2 = make_model(args.mode, device)
    opt2 = make_optimizer(model2, args.proj)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    train(forward2, opt2, range(half, args.steps), device)
    same = all(torch.equal(a, b) for a, b in zip(final, parameters(model2)))
    say(f"resumed from {folder} at step {half}: bitwise equal at step {args.steps}: {'yes' if same else 'NO'}")
    dist.barrier()
    if rank == 0 and args.checkpoint is None:
        shutil.rmtree(folder)  # the temporary one
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
