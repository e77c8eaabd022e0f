"""`python -m fusedtrain sae train`: train a sparse autoencoder on one layer of a Hugging Face model.

    python -m fusedtrain sae train --model PATH_OR_NAME --layer L --text FILE \\
        [--num-latents F --k K --routing R --steps S --batch-tokens B --lr LR --out DIR]

Loads `AutoModel` and `AutoTokenizer` from PATH_OR_NAME (a local folder works offline), streams the
activations of block L's output over the lines of FILE (integrations/activations.py), trains
`fusedtrain.sae.SparseAutoencoder` on them with Adam and the decoder kept at unit norm, prints a
progress line (FVU, dead latents, tokens/s) and saves it with `save_to_disk` (sparsify's layout).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from ..sae import ROUTINGS, SparseAutoencoder
from ..sae.persistence import save_sae
from .activations import find_hookpoint, shuffled_batches, stream_activations

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_lr(num_latents: int) -> float:
    """2e-4 at 2^14 latents, scaled as 1/sqrt(latents): the scaling Gao et al. (2024) fit for TopK SAEs."""
    return 2e-4 / math.sqrt(num_latents / 2 ** 14)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fusedtrain sae train",
                                     description="Train a sparse autoencoder on a Hugging Face model's activations.")
    where = parser.add_argument_group("what to train on")
    where.add_argument("--model", required=True, help="model folder or hub name (AutoModel + AutoTokenizer)")
    where.add_argument("--layer", type=int, help="block whose output is encoded (negative: from the end)")
    where.add_argument("--hookpoint", help="instead of --layer: a module name from model.named_modules()")
    where.add_argument("--text", required=True, help="UTF-8 text file; each non-empty line is a sequence")
    where.add_argument("--seq-len", type=int, default=256, help="tokens per row; longer lines continue in new rows")
    where.add_argument("--batch-lines", type=int, default=32, help="lines per model forward")
    where.add_argument("--keep-special-tokens", action="store_true",
                       help="also train on special tokens (BOS, CLS, SEP...), dropped by default")
    sae = parser.add_argument_group("the autoencoder")
    sae.add_argument("--num-latents", type=int, help="latents F (default: 16 x the activation width)")
    sae.add_argument("--k", type=int, default=32, help="latents per token (TopK; the budget of the other routings)")
    sae.add_argument("--routing", choices=ROUTINGS + ("threshold",), default="topk")
    sae.add_argument("--theta", type=float, help="with --routing threshold: the activation threshold of every latent "
                                                   "(each token keeps the latents with pre > theta; --k is unused)")
    sae.add_argument("--dead-tokens", type=int, default=10_000_000,
                     help="a latent is dead after this many tokens without firing (AuxK revives it)")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-tokens", type=int, default=4096, help="tokens per SAE step")
    train.add_argument("--lr", type=float, help="Adam learning rate (default: 2e-4 x sqrt(2^14 / F))")
    train.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    train.add_argument("--device", help="default: cuda when available, else cpu")
    train.add_argument("--model-dtype", choices=list(DTYPES), default="auto", help="dtype to load the model in")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", help="output folder (default: sae-<model>-<hookpoint>)")
    return parser


def _check_positive(parser, args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _load(args):
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise SystemExit(f"`sae train` needs the transformers package (pip install transformers): {exc}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, dtype=DTYPES[args.model_dtype])
    return model.eval().to(args.device), tokenizer


def train(args) -> dict:
    """Runs the training described by parsed `args`; returns the summary that is saved with the SAE."""
    torch.manual_seed(args.seed)
    model, tokenizer = _load(args)
    try:
        hookpoint, module = find_hookpoint(model, args.layer, args.hookpoint)
    except ValueError as exc:
        raise SystemExit(f"python -m fusedtrain sae train: error: {exc}") from None
    seq_len = min(args.seq_len, getattr(model.config, "max_position_embeddings", args.seq_len) or args.seq_len)
    progress = {"epoch": 0}
    stream = stream_activations(model, module, tokenizer, args.text, seq_len=seq_len, batch_lines=args.batch_lines,
                                exclude_special=not args.keep_special_tokens, device=args.device, progress=progress)
    batches = shuffled_batches(stream, args.batch_tokens)
    start = time.perf_counter()
    first = next(batches).float()
    d = first.shape[1]
    num_latents = args.num_latents or 16 * d
    if args.routing == "topk" and args.k > num_latents:
        raise SystemExit(f"--k ({args.k}) must be <= --num-latents ({num_latents}) for topk routing")
    sae = SparseAutoencoder(d, num_latents, args.routing, args.k, dead_tokens_threshold=args.dead_tokens,
                            theta=args.theta, device=first.device)
    with torch.no_grad():
        sae.b_dec.copy_(first.mean(0))  # start the decoder bias at the data's mean: the first FVU is then ~1
    lr = args.lr or default_lr(num_latents)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    print(f"SAE {d} -> {num_latents} latents, {args.routing} k={args.k}, on {hookpoint} of {args.model}; "
          f"{args.steps} steps of {args.batch_tokens} tokens, lr {lr:.3g}, {first.device}", flush=True)
    fvus, first_fvu = [], None
    for step in range(1, args.steps + 1):
        x = first if step == 1 else next(batches).float()
        out = sae(x)
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        fvus.append(out.fvu.item())
        if step == 1:
            first_fvu = fvus[0]
        if step % args.log_every == 0 or step == args.steps:
            dead = int((sae.num_tokens_since_fired > sae.dead_tokens_threshold).sum())
            rate = step * args.batch_tokens / (time.perf_counter() - start)
            print(f"step {step}/{args.steps}  fvu {sum(fvus) / len(fvus):.4f}  dead {dead}/{num_latents} "
                  f"({100 * dead / num_latents:.1f}%)  {rate:,.0f} tokens/s  (text pass {progress['epoch']})",
                  flush=True)
            last_fvu, fvus = sum(fvus) / len(fvus), []
    elapsed = time.perf_counter() - start
    from .._version import __version__
    summary = {"model": args.model, "hookpoint": hookpoint, "layer": args.layer, "text": os.path.basename(args.text),
               "steps": args.steps, "batch_tokens": args.batch_tokens, "lr": lr, "seed": args.seed,
               "tokens": args.steps * args.batch_tokens, "text_passes": progress["epoch"], "first_fvu": first_fvu,
               "final_fvu": last_fvu, "seconds": round(elapsed, 3), "fusedtrain_version": __version__}
    out_dir = args.out or f"sae-{os.path.basename(os.path.normpath(args.model))}-{hookpoint}"
    save_sae(sae, out_dir, metadata={"training": summary})
    print(f"saved to {out_dir} (FVU {first_fvu:.4f} -> {last_fvu:.4f}, {elapsed:.1f} s)", flush=True)
    return summary


def main(argv: list[str]) -> int:
    """`python -m fusedtrain sae <command> ...`; the one command is `train`."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fusedtrain sae train --model PATH_OR_NAME --layer L --text FILE [options]\n"
              "       python -m fusedtrain sae train --help   (every option)", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] != "train":
        print(f"python -m fusedtrain sae: unknown command {argv[0]!r} (the one command is `train`)", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    _check_positive(parser, args, "steps", "batch_tokens", "k", "num_latents", "seq_len", "batch_lines", "log_every")
    if (args.layer is None) == (args.hookpoint is None):
        parser.error("give exactly one of --layer and --hookpoint")
    if (args.theta is None) == (args.routing == "threshold"):
        parser.error("--theta is needed by --routing threshold, and only by it")
    if args.theta is not None and not math.isfinite(args.theta):
        parser.error(f"--theta must be finite, got {args.theta}")
    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text!r} is not a file")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    train(args)
    return 0
