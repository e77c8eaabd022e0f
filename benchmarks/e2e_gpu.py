"""End-to-end runs for the GPU validation (benchmarks/gpu_suite.sh, stage `e2e`): what a GPU buys a user.

1. examples/next_token_spherical_head.py with the fused Z-loss head and with the cross-entropy
   baseline, in fp32 and under bf16 autocast: held-out top-1 / top-5 and wall time of each.
2. `python -m fusedtrain sae train` on a randomly initialised Llama saved locally with a word-level
   tokenizer (no network on the GPU machine, so no pretrained model): tokens per second end to end
   (model forward included) and the FVU curve of a TopK SAE.

Each run's output goes to OUT/<name>.log; OUT/e2e_summary.txt has one line per run.
    python benchmarks/e2e_gpu.py --device cuda --out OUT          # the GPU run (a few minutes)
    python benchmarks/e2e_gpu.py --device cpu --quick --out OUT   # a dry run of the script itself
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(name: str, cmd: list[str], out: pathlib.Path, summary: list[str]) -> str:
    """Runs `cmd`, logs it to out/name.log, notes its last line and time in `summary`."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    text = done.stdout + done.stderr
    (out / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + text)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    summary.append(f"{name}: rc={done.returncode} {seconds:.1f} s | {last}")
    print(summary[-1], flush=True)
    return text


def next_token_runs(args, out: pathlib.Path, summary: list[str]) -> None:
    example = str(ROOT / "examples" / "next_token_spherical_head.py")
    extra = ["--steps", "20", "--tokens", "200000"] if args.quick else []
    for loss in ("z", "ce"):
        for amp in ([], ["--amp"]):
            name = f"next_token_{loss}{'_bf16' if amp else '_fp32'}"
            run(name, [sys.executable, example, "--loss", loss, "--device", args.device, *amp, *extra], out, summary)


def save_word_llama(folder: pathlib.Path, words: list[str], hidden: int, layers: int) -> None:
    """A randomly initialised Llama and a whitespace word-level tokenizer (prepends [BOS])."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[BOS]"]
    vocab = {token: i for i, token in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                         bos_token="[BOS]").save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 256), max_position_embeddings=512,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(folder)


def sae_run(args, out: pathlib.Path, summary: list[str]) -> None:
    import torch

    hidden, layers = (32, 2) if args.quick else (1024, 4)
    words = [f"w{i}" for i in range(2000)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "word_llama"
        save_word_llama(folder, words, hidden, layers)
        # Zipf-distributed words, so the activations have structure worth encoding.
        g = torch.Generator().manual_seed(0)
        ranks = torch.arange(1, len(words) + 1, dtype=torch.float64)
        draws = torch.multinomial(1 / ranks, 64 * (200 if args.quick else 4000), replacement=True, generator=g)
        text = pathlib.Path(tmp) / "text.txt"
        text.write_text("\n".join(" ".join(words[i] for i in row) for row in draws.view(-1, 64).tolist()) + "\n")
        steps, tokens, latents = ("20", "256", "512") if args.quick else ("300", "8192", "32768")
        run("sae_train_topk", [sys.executable, "-m", "fusedtrain", "sae", "train", "--model", str(folder),
                               "--layer", str(layers // 2), "--text", str(text), "--num-latents", latents, "--k", "32",
                               "--steps", steps, "--batch-tokens", tokens, "--log-every", "50",
                               "--device", args.device, "--out", str(pathlib.Path(tmp) / "sae")], out, summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny runs (to check the script, not to measure)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: list[str] = [f"device {args.device}{' (quick)' if args.quick else ''}"]
    next_token_runs(args, out, summary)
    sae_run(args, out, summary)
    (out / "e2e_summary.txt").write_text("\n".join(summary) + "\n")
    sys.exit(0 if all("rc=0" in line for line in summary[1:]) else 1)


if __name__ == "__main__":
    main()
