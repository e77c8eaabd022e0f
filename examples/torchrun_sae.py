"""Train a latent-sharded sparse autoencoder on P ranks and check it against one process.

Each rank holds num_latents / P latents (`SparseAutoencoder(..., process_group=WORLD)`); the input
batch is the same on every rank. Routing, decode, FVU and AuxK are global, so the sharded SAE takes
the single-process steps exactly: rank 0 replays them in one process from the same start
(`full_state_dict` / `load_full_state_dict`) and prints the largest parameter difference.

    PYTHONPATH=python torchrun --nproc-per-node 2 examples/torchrun_sae.py [--routing topk] [--steps 20]
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from fusedtrain.sae import SparseAutoencoder


def batch(step: int, size: int, d: int, basis: torch.Tensor) -> torch.Tensor:
    """Sparse combinations of a fixed dictionary plus noise (the same on every rank)."""
    g = torch.Generator().manual_seed(500 + step)
    codes = torch.rand(size, basis.shape[0], generator=g, dtype=basis.dtype)
    codes = codes * (torch.rand(size, basis.shape[0], generator=g) < 0.05)
    return codes @ basis + 0.01 * torch.randn(size, d, generator=g, dtype=basis.dtype)


def train(sae, steps, size, basis, log) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for step in range(steps):
        out = sae(batch(step, size, basis.shape[1], basis))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        if log and step % 5 == 0:
            print(f"step {step:3d}  fvu {out.fvu.item():.5f}  auxk {out.auxk_loss.item():.5f}  dead {out.num_dead}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--routing", default="topk", choices=["topk", "feature_choice", "mutual_choice"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--latents", type=int, default=256)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    d, size = 32, 64
    torch.manual_seed(0)
    basis = torch.nn.functional.normalize(torch.randn(128, d, dtype=torch.float64), dim=1)
    kw = dict(dtype=torch.float64, dead_tokens_threshold=256)  # small, so that AuxK runs in a short demo
    sae = SparseAutoencoder(d, args.latents, args.routing, 8, process_group=dist.group.WORLD, **kw)
    start = sae.full_state_dict()
    train(sae, args.steps, size, basis, rank == 0)
    end = sae.full_state_dict()  # a collective: every rank calls it
    if rank == 0:
        single = SparseAutoencoder(d, args.latents, args.routing, 8, **kw)
        single.load_state_dict(start)
        train(single, args.steps, size, basis, False)
        diff = max((end[n] - v).abs().max().item() for n, v in single.state_dict().items() if v.is_floating_point())
        print(f"{dist.get_world_size()} latent shards vs one process: max |parameter difference| = {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
