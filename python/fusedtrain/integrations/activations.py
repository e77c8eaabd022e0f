"""Activations of one module of a Hugging Face model, streamed from a text file, for training an SAE.

`find_hookpoint(model, layer=L)` picks the output of the model's L-th block (the residual stream after
it); `stream_activations(...)` tokenizes the text a batch of lines at a time, runs the model only up to
that module (a forward hook captures its output and stops the forward there), and yields the
activations of the real tokens (padding, and by default special tokens such as BOS/CLS, dropped);
`shuffled_batches(...)` turns that stream into training batches of exactly `batch_tokens` rows, mixed
across lines.
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the hooked module is needed."""


def find_hookpoint(model: nn.Module, layer: int | None = None, hookpoint: str | None = None) -> tuple[str, nn.Module]:
    """(name, module) of the module whose output is captured: `hookpoint` (a module name, as in
    `model.named_modules()`), or block `layer` (negative counts from the end) of the model's stack of
    `num_hidden_layers` blocks."""
    modules = dict(model.named_modules())
    if hookpoint is not None:
        if hookpoint not in modules:
            near = [name for name in modules if name.endswith(hookpoint.rsplit(".", 1)[-1])][:5]
            raise ValueError(f"hookpoint {hookpoint!r} is not a module of {type(model).__name__} (similar: {near})")
        return hookpoint, modules[hookpoint]
    if layer is None:
        raise ValueError("give a layer (--layer) or a hookpoint (--hookpoint)")
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(config, "num_hidden_layers", None)
    stacks = [(name, m) for name, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not stacks:
        raise ValueError(f"cannot find {type(model).__name__}'s stack of {count} blocks; name the module with "
                         f"--hookpoint (one of the model's named_modules())")
    name, stack = stacks[0]  # the first in module order: the encoder's (or the decoder's) main stack
    if not -len(stack) <= layer < len(stack):
        raise ValueError(f"layer must be in [{-len(stack)}, {len(stack)}) for {type(model).__name__} "
                         f"({len(stack)} blocks in {name}), got {layer}")
    index = layer % len(stack)
    return f"{name}.{index}", stack[index]


def _read_lines(path: str, batch_lines: int) -> Iterator[list[str]]:
    """Non-empty lines of the file, `batch_lines` at a time (the file is read lazily)."""
    with open(path, encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        lines = (line for line in lines if line)
        while chunk := list(itertools.islice(lines, batch_lines)):
            yield chunk


def _model_inputs(model: nn.Module, encoded: dict) -> dict:
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in encoded.items() if k in accepted}


def stream_activations(model: nn.Module, module: nn.Module, tokenizer, text_path: str, *, seq_len: int,
                       batch_lines: int = 32, exclude_special: bool = True, device=None,
                       epochs: int | None = None, progress: dict | None = None) -> Iterator[torch.Tensor]:
    """(tokens, d) activations of `module`'s output, for the real tokens of the text, batch of lines by
    batch of lines; a line longer than `seq_len` tokens continues in further rows. Loops over the file
    `epochs` times (None: forever); `progress["epoch"]` (when given) counts the passes begun. The model
    runs in no_grad, only up to `module`."""
    if tokenizer.pad_token is None:  # padding only fills the batch; its positions are dropped
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _StopForward

    handle = module.register_forward_hook(capture)
    try:
        for epoch in itertools.count():
            if epochs is not None and epoch >= epochs:
                return
            if progress is not None:
                progress["epoch"] = epoch + 1
            found = False
            for lines in _read_lines(text_path, batch_lines):
                encoded = tokenizer(lines, truncation=True, max_length=seq_len, padding=True, return_tensors="pt",
                                    return_overflowing_tokens=True, return_special_tokens_mask=True)
                keep = encoded["attention_mask"].bool()
                if exclude_special:
                    keep &= ~encoded["special_tokens_mask"].bool()
                inputs = {k: v.to(device) for k, v in _model_inputs(model, encoded).items()}
                captured.clear()
                with torch.no_grad():
                    try:
                        model(**inputs)
                    except _StopForward:
                        pass
                if not captured:
                    raise RuntimeError("the model's forward never reached the hooked module")
                acts = captured[0]
                if acts.shape[:2] != keep.shape:
                    raise RuntimeError(f"the hooked module's output has shape {tuple(acts.shape)}, expected "
                                       f"(batch, tokens, d) with (batch, tokens) = {tuple(keep.shape)}")
                rows = acts[keep.to(acts.device)]
                found = found or rows.shape[0] > 0
                yield rows
            if not found:
                raise ValueError(f"{text_path} yields no tokens to train on (empty, or only special tokens)")
    finally:
        handle.remove()


def shuffled_batches(stream: Iterator[torch.Tensor], batch_tokens: int, buffer_batches: int = 8,
                     generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Batches of exactly `batch_tokens` rows drawn at random from a buffer of about `buffer_batches`
    batches, so that one batch mixes many lines (consecutive tokens of a line are correlated)."""
    buffer: list[torch.Tensor] = []
    held = 0
    for rows in stream:
        buffer.append(rows)
        held += rows.shape[0]
        if held < batch_tokens * buffer_batches:
            continue
        pool = torch.cat(buffer)
        pool = pool[torch.randperm(pool.shape[0], generator=generator).to(pool.device)]
        full = pool.shape[0] // batch_tokens
        keep = max(full // 2, 1)  # yield half, keep the rest to mix with what comes next
        for i in range(keep):
            yield pool[i * batch_tokens:(i + 1) * batch_tokens]
        rest = pool[keep * batch_tokens:]
        buffer, held = [rest], rest.shape[0]
