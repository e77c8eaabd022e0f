"""Train a small transformer language model with FRUGAL and with AdamW and report both losses.

The data is synthetic but learnable: sequences from a fixed random bigram model over a small
vocabulary, so the best achievable loss is the bigram entropy (printed). The embedding and the
output head stay on plain AdamW (`proj=None` group), as the FRUGAL paper does; the transformer's
weight matrices get FRUGAL with density 0.25 and column projections.

    PYTHONPATH=python python examples/frugal_train.py [--steps 300] [--device cpu|cuda] [--proj columns]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedtrain.optim import FRUGAL


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = self.blocks(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(self.norm(x))


def bigram_data(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=gen) * 2.5
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean().item()

    def batch(size: int, length: int, device):
        tokens = torch.empty(size, length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (size,), generator=gen)
        for t in range(length):
            tokens[:, t + 1] = torch.multinomial(probs[tokens[:, t]], 1, generator=gen).squeeze(1)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    return batch, entropy


def make_optimizer(name: str, model: TinyLM, lr: float, proj: str):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    edge = [model.embed.weight, model.pos, model.head.weight, model.head.bias]
    edge_ids = {id(p) for p in edge}
    body = [p for p in model.parameters() if id(p) not in edge_ids]
    return FRUGAL([{"params": body}, {"params": edge, "proj": None}], lr=lr, weight_decay=0.01,
                  density=0.25, proj=proj, update_gap=100, seed=0)


def train(name: str, args, batch) -> tuple[float, float]:
    torch.manual_seed(0)  # same initial weights for both optimizers
    model = TinyLM(args.vocab, args.d_model, args.layers, args.context).to(args.device)
    opt = make_optimizer(name, model, args.lr, args.proj)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    start = time.perf_counter()
    recent = []
    for step in range(args.steps):
        x, y = batch(args.batch, args.context, args.device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  {name:6s} step {step + 1:4d}: loss {sum(recent) / len(recent):.4f}")
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    print(f"  {name:6s} done in {time.perf_counter() - start:.1f} s, optimizer state {state / 2**20:.2f} MiB")
    return sum(recent) / len(recent), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--proj", default="columns", choices=["columns", "rows", "block", "svd", "random"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    results = {}
    for name in ("frugal", "adamw"):
        batch, entropy = bigram_data(args.vocab, seed=1)  # the same batches for both
        results[name] = train(name, args, batch)
    print(f"\nfinal loss (mean of the last 20 steps), best possible {entropy:.4f}, uniform {math.log(args.vocab):.4f}:")
    for name, (loss, state) in results.items():
        print(f"  {name:6s} {loss:.4f}   optimizer state {state / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
