"""Train a Hugging Face causal LM with `Trainer`, the fused spherical loss and the FRUGAL optimizer.

`apply_spherical_loss` makes `model(input_ids, labels=labels).loss` the Z-loss computed by the fused
linear op (the batch x vocabulary logits are never formed in training); `Trainer` passes
`num_items_in_batch` under gradient accumulation and the patched model honours it as HF's own loss
does. Without `--model`, a small Llama is initialised at random (no download) and trained on sequences
from a fixed random bigram model, so the loss has something to learn.

    PYTHONPATH=python python examples/hf_trainer_spherical.py [--model PATH] [--steps 60] [--kind z]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from fusedtrain.integrations.transformers import apply_spherical_loss
from fusedtrain.optim import FRUGAL


def bigram_sequences(vocab: int, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """`count` sequences of a fixed random bigram model over `vocab` tokens (peaked transitions)."""
    g = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), dim=1)
    tokens = torch.empty(count, length, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, vocab, (count,), generator=g)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(transitions[tokens[:, t - 1]], 1, generator=g).squeeze(1)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal LM folder or hub name (default: a small random Llama)")
    parser.add_argument("--kind", default="z", choices=["z", "spherical", "taylor", "mse"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    else:
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=128, intermediate_size=256,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    apply_spherical_loss(model, kind=args.kind)  # before any FSDP / DeepSpeed wrapping

    vocab = model.get_output_embeddings().weight.shape[0]
    data = bigram_sequences(min(vocab, args.vocab), 512, 64)
    rows = [{"input_ids": seq, "labels": seq} for seq in data]
    # FRUGAL on the weight matrices, plain AdamW (proj=None) on the embeddings, as the FRUGAL paper does.
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    body = [p for p in model.parameters() if id(p) not in embeddings]
    head = [p for p in model.parameters() if id(p) in embeddings]
    optimizer = FRUGAL([{"params": body}, {"params": head, "proj": None}], lr=3e-3, density=0.25)

    with tempfile.TemporaryDirectory() as out:
        trainer_args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=args.steps,
            logging_steps=max(1, args.steps // 6), per_device_eval_batch_size=32, report_to=[], save_strategy="no",
            disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=trainer_args, train_dataset=rows, eval_dataset=rows[:64],
                                       optimizers=(optimizer, None))
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    print(f"{args.kind} loss on held-in data: {before:.4f} before training, {after:.4f} after {args.steps} steps")


if __name__ == "__main__":
    main()
