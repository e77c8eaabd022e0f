"""Train a Hugging Face causal LM with the fused linear spherical loss (docs/integrations.md).

    from fusedtrain.integrations.transformers import apply_spherical_loss
    apply_spherical_loss(model, kind="z", a=0.05, b=20.0)
    model.train()
    loss = model(input_ids, labels=labels).loss      # .logits is None: the N x V logits never exist

How it works. Two methods of the *instance* are replaced (the class and other instances are
untouched, `state_dict` keeps its keys):

- the model's `forward`: in training mode with `labels`, it hands the labels to the output
  embedding and runs the model's own forward without them;
- the output embedding's `forward` (`lm_head`, an `nn.Linear`): given labels, it returns
  `linear_spherical_loss(hidden, weight, shifted labels, linear_bias=bias)` instead of the logits.

The loss is computed, and returned, by the output embedding's own forward, so under FSDP its weight
is gathered exactly as for the logits and the loss carries the module's backward hooks. A model
that transforms the logits after the output embedding (final-logit softcapping as in Gemma 2/3, a
logit scale as in Cohere or Granite) cannot use the fused op: softcapping is refused when the patch
is applied (from the config), any other transform when the first forward sees it.

Semantics are those of the model's own `ForCausalLMLoss` with the loss swapped: labels shifted left
with `ignore_index` (default -100) padded at the end (or `shift_labels` when given), the mean over kept
tokens, or with `num_items_in_batch` (which `Trainer` passes under gradient accumulation) the sum
divided by it. The loss comes back in float32 (float64 for a float64 model) like HF's.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..spherical import linear_spherical_loss
from ..spherical.stats_cache import StatsCache

__all__ = ["apply_spherical_loss", "remove_spherical_loss", "is_patched", "SUPPORTED_HYPERPARAMETERS"]

# `linear_spherical_loss` without its autocast policy (`_core.autocast.policy`), which gives a loss the
# input's dtype outside autocast: the op's own result, in the accumulate type (fp32 for bf16/fp16).
_loss_in_accumulate_type = linear_spherical_loss.__wrapped__
# Keywords of `linear_spherical_loss` that are the loss's own (the rest comes from the model and labels).
SUPPORTED_HYPERPARAMETERS = ("a", "b", "eps", "var_eps", "ignore_index", "check_target")
# Config attributes that apply a tanh softcap to the final logits (Gemma 2, 3, 3n, 4, ...).
_SOFTCAP_ATTRIBUTES = ("final_logit_softcapping",)
_SETTINGS = "_fusedtrain_spherical"            # on the model: what apply_spherical_loss was given
_REQUEST = "_fusedtrain_spherical_request"     # on the output embedding, during one forward only


@dataclass
class _Settings:
    kind: str
    hyperparameters: dict
    # The output embedding's weight statistics, computed once per weight version (spherical/stats_cache.py):
    # gradient-accumulation micro-batches and evaluation batches reuse them.
    stats: StatsCache


@dataclass
class _LossRequest:
    """What the model's forward hands to its output embedding for one call."""
    labels: torch.Tensor | None
    shift_labels: torch.Tensor | None
    num_items_in_batch: torch.Tensor | int | None
    ignore_index: int
    settings: _Settings
    return_logits: bool                  # eval mode: logits as usual, the loss on the side
    answered: bool = False               # the output embedding has returned the loss (or logits)
    loss: torch.Tensor | None = None     # set by the output embedding
    head_output: torch.Tensor | None = None  # eval: the logits the output embedding returned


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # an optional extra
        raise ImportError("fusedtrain.integrations.transformers needs the `transformers` package "
                          "(pip install transformers)") from exc


def _text_config(model):
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _check_model(model) -> nn.Linear:
    """The model's output embedding, after checking that the fused op computes its loss."""
    _require_transformers()
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (a causal LM), got {type(model).__name__}")
    config = _text_config(model)
    for name in _SOFTCAP_ATTRIBUTES:
        if getattr(config, name, None):
            raise ValueError(f"{type(model).__name__} applies final logit softcapping (config.{name} = "
                             f"{getattr(config, name)}): the fused spherical loss works on the plain projection "
                             f"and cannot softcap; set config.{name} = None to train without it")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}'s output embedding must be an nn.Linear (a causal LM head), got "
                        f"{type(head).__name__}")
    # model.loss_function without its warning for loss_type None (which also means ForCausalLMLoss)
    loss_function = getattr(model, "_loss_function", None) or LOSS_MAPPING.get(getattr(model, "loss_type", None),
                                                                              ForCausalLMLoss)
    if loss_function is not ForCausalLMLoss:
        raise ValueError(f"{type(model).__name__}'s loss is {getattr(loss_function, '__name__', loss_function)}, "
                         f"not ForCausalLMLoss: apply_spherical_loss replaces only the causal-LM cross-entropy")
    return head


def _check_hyperparameters(kind: str, hyperparameters: dict) -> None:
    unknown = sorted(set(hyperparameters) - set(SUPPORTED_HYPERPARAMETERS))
    if unknown:
        raise TypeError(f"apply_spherical_loss got unknown hyperparameters {unknown}; it accepts "
                        f"{list(SUPPORTED_HYPERPARAMETERS)} (the rest comes from the model and the labels)")
    # Let the op's own checks name a bad kind or value now rather than at the first training step.
    one = torch.zeros(1, 1, dtype=torch.float64)
    linear_spherical_loss(one, one, torch.zeros(1, dtype=torch.int64), kind=kind, **hyperparameters)


def apply_spherical_loss(model, kind: str = "z", *, detect_data_writes: bool = True, **hyperparameters):
    """Make `model(..., labels=labels).loss` the fused spherical loss; returns `model` (patched in place).

    model: a loaded transformers causal LM (`*ForCausalLM`, `GPT2LMHeadModel`, ...) whose loss is HF's
      `ForCausalLMLoss` and whose output embedding is an `nn.Linear` (tied to the input embedding or
      not, with or without bias). Apply it before wrapping the model with FSDP / DeepSpeed / PEFT.
    kind: "z" (default), "spherical", "taylor" or "mse" (see docs/spherical.md).
    hyperparameters: `a`, `b`, `eps`, `var_eps` of the loss, `check_target`, and `ignore_index`
      (default -100; an `ignore_index` passed to the forward wins, as in HF).

    detect_data_writes: as `SphericalHead`'s. The output embedding's statistics (Gram matrix and
      column sums, 2·V·d² flops) are computed once per weight version and reused by gradient-
      accumulation micro-batches and evaluation; a write through `.data` is caught by a fingerprint of
      4096 weight entries (one host sync per forward on CUDA), which False drops.

    Training mode with labels: `.loss` is the spherical loss and `.logits` is None (never formed).
    Eval mode with labels: `.logits` as before and `.loss` the same spherical loss (so evaluation
    reports the loss that is trained). Without labels: the model is unchanged.
    Calling it again replaces the settings; `remove_spherical_loss(model)` undoes it.
    """
    head = _check_model(model)
    _check_hyperparameters(kind, hyperparameters)
    setattr(model, _SETTINGS, _Settings(kind, dict(hyperparameters), StatsCache(bool(detect_data_writes))))
    if not is_patched(model):
        model.forward = types.MethodType(_patched_model_forward(type(model).forward), model)
        head.forward = types.MethodType(_head_forward, head)
    return model


def remove_spherical_loss(model):
    """Undo `apply_spherical_loss`: the model computes its own loss again. Returns `model`."""
    if is_patched(model):
        del model.forward
        head = model.get_output_embeddings()
        if "forward" in head.__dict__:
            del head.forward
        delattr(model, _SETTINGS)
    return model


def is_patched(model) -> bool:
    return isinstance(getattr(model, _SETTINGS, None), _Settings) and "forward" in model.__dict__


def _patched_model_forward(class_forward):
    """The replacement of the model's forward, with the class forward's signature (so that `Trainer`
    and `generate` see the same parameters, `**kwargs` included). A plain function with no reference
    to the module, so `copy.deepcopy(model)` copies a working patch."""

    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        bound = inspect.signature(class_forward).bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None:
            return class_forward(*bound.args, **bound.kwargs)
        return _forward_with_spherical_loss(self, class_forward, bound)

    return forward


def _forward_with_spherical_loss(model, class_forward, bound):
    settings: _Settings = getattr(model, _SETTINGS)
    parameters = inspect.signature(class_forward).parameters
    var_keyword = next((p.name for p in parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = bound.arguments.setdefault(var_keyword, {}) if var_keyword else {}

    def argument(name, default=None):
        return bound.arguments.get(name, extra.get(name, default))

    # Run the class forward with return_dict=True; the caller's choice is applied at the end.
    return_dict = argument("return_dict")
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if "return_dict" in parameters:
        bound.arguments["return_dict"] = True
    elif var_keyword:
        extra["return_dict"] = True
    request = _LossRequest(
        labels=bound.arguments["labels"], shift_labels=argument("shift_labels"),
        num_items_in_batch=argument("num_items_in_batch"),
        ignore_index=argument("ignore_index", settings.hyperparameters.get("ignore_index", -100)),
        settings=settings, return_logits=not model.training)
    bound.arguments["labels"] = None
    head = model.get_output_embeddings()
    setattr(head, _REQUEST, request)
    try:
        out = class_forward(*bound.args, **bound.kwargs)
    except Exception as exc:
        if request.answered:  # the model failed on what the output embedding returned
            raise RuntimeError(f"{type(model).__name__} transforms the logits after its output embedding, which the "
                               f"fused spherical loss cannot do (see the error above)") from exc
        raise
    finally:
        if getattr(head, _REQUEST, None) is request:
            delattr(head, _REQUEST)
    if not request.answered:
        raise RuntimeError(f"{type(model).__name__}'s forward never called its output embedding "
                           f"({type(head).__name__}): apply_spherical_loss cannot compute the loss")
    # The class forward must pass the output embedding's result through untouched.
    if out.logits is not (request.head_output if request.return_logits else request.loss):
        _raise_transformed(model)
    logits = out.logits if request.return_logits else None
    values = {key: value for key, value in out.items() if key not in ("loss", "logits")}
    result = type(out)(loss=request.loss, logits=logits, **values)
    return result if return_dict else result.to_tuple()


def _raise_transformed(model):
    raise RuntimeError(f"{type(model).__name__} transforms the logits after its output embedding (a logit scale or "
                       f"softcap): the fused spherical loss works on the plain projection and cannot be used with it")


def _shifted_targets(request: _LossRequest) -> torch.Tensor:
    """HF's causal shift: position i predicts label i + 1; the last position predicts nothing."""
    if request.shift_labels is not None:
        return request.shift_labels
    labels = request.labels
    return nn.functional.pad(labels, (0, 1), value=request.ignore_index)[..., 1:]


def _head_forward(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output embedding's forward: the logits, or (in a loss request) the fused loss."""
    request: _LossRequest | None = head.__dict__.get(_REQUEST)
    if request is None or request.answered:
        return type(head).forward(head, hidden)
    request.loss = _fused_loss(head, hidden, request)
    if request.return_logits:
        request.head_output = type(head).forward(head, hidden)
    request.answered = True  # from here on, a failure of the model's forward is about what we returned
    return request.head_output if request.return_logits else request.loss


def _fused_loss(head: nn.Linear, hidden: torch.Tensor, request: _LossRequest) -> torch.Tensor:
    weight, bias = head.weight, head.bias
    if _is_dtensor(weight):
        raise NotImplementedError("the output embedding's weight is a DTensor (tensor parallelism): the fused "
                                  "spherical loss needs the whole vocabulary on each rank")
    target = _shifted_targets(request).to(hidden.device)
    positions = hidden.shape[:-1].numel()
    if target.numel() != positions:
        raise ValueError(f"labels give {target.numel()} targets after the causal shift but the model projects "
                         f"{positions} positions (hidden states {tuple(hidden.shape)}); with logits_to_keep, pass "
                         f"matching shift_labels")
    settings = request.settings
    # Read before the cast below, under the caller's autocast: the statistics of the weight as the loss reads it.
    stats = None if torch.compiler.is_compiling() else settings.stats.get(weight, bias, module=head)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as F.linear under autocast: the projection in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    hyper = {k: v for k, v in settings.hyperparameters.items() if k != "ignore_index"}
    reduction = "mean" if request.num_items_in_batch is None else "sum"
    # HF computes its loss in float32 from logits upcast first; the op's loss is its fp32 accumulation,
    # taken before the public function's policy would round it to a bf16/fp16 model's dtype.
    with torch.autocast(device_type, enabled=False):
        loss = _loss_in_accumulate_type(hidden.reshape(positions, hidden.shape[-1]), weight,
                                        target.reshape(positions), linear_bias=bias, stats=stats, kind=settings.kind,
                                        ignore_index=request.ignore_index, reduction=reduction, **hyper)
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32))  # HF's loss is float32
    if request.num_items_in_batch is not None:
        count = request.num_items_in_batch
        loss = loss / (count.to(loss.device) if torch.is_tensor(count) else count)
    return loss


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)
