"""`fusedtrain.integrations.transformers.apply_spherical_loss` on tiny random HF causal LMs (no downloads):
the loss and every parameter's gradient against the float64 spherical loss of the unpatched model's
logits, HF's shift / -100 / num_items_in_batch conventions, eval mode, refusals, and a Trainer run
with FRUGAL under gradient accumulation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fusedtrain.integrations.transformers import (apply_spherical_loss, is_patched,  # noqa: E402
                                                  remove_spherical_loss)
from fusedtrain.reference import spherical as spherical_reference  # noqa: E402
from utils import rel_err  # noqa: E402

V, D = 37, 16  # vocabulary, hidden size


def tiny_model(family: str, tie: bool = True, bias: bool = False, dtype=torch.float64):
    """A tiny randomly initialised causal LM of `family`, without dropout (training mode is then
    deterministic), optionally with a bias in an untied output embedding."""
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0, tie_word_embeddings=tie)
        model = transformers.GPT2LMHeadModel(config)
    else:
        classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                   "mistral": ("MistralConfig", "MistralForCausalLM")}[family]
        config = getattr(transformers, classes[0])(
            vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=0,
            eos_token_id=0, pad_token_id=0)
        model = getattr(transformers, classes[1])(config)
    if bias:
        assert not tie
        model.lm_head = nn.Linear(D, V, bias=True)
        nn.init.normal_(model.lm_head.bias)
    return model.to(dtype).train()


def batch(B=3, T=9, ignored=4):
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels.view(-1)[torch.randperm(B * T)[:ignored]] = -100
    return ids, labels


def shifted(labels, ignore_index=-100):
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def reference_loss_and_grads(model, ids, labels, kind="z", **hyper):
    """The unpatched model's logits through the float64 spherical-loss oracle: loss and grads."""
    model.zero_grad()
    logits = model(ids).logits
    assert logits.shape == (*ids.shape, V)
    loss = spherical_reference.spherical_loss(logits.reshape(-1, V), shifted(labels).reshape(-1), kind, **hyper)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie,bias", [(True, False), (False, False), (False, True)], ids=["tied", "untied", "bias"])
def test_loss_and_gradients_match_unpatched_logits(family, tie, bias):
    if family == "gpt2" and not tie and bias:
        pytest.skip("one bias case per decoder family is enough")
    model = tiny_model(family, tie, bias)
    ids, labels = batch()
    ref_loss, ref_grads = reference_loss_and_grads(model, ids, labels)
    apply_spherical_loss(model)
    out = model(ids, labels=labels)
    assert out.logits is None
    assert out.loss.dtype == torch.float64
    assert rel_err(out.loss, ref_loss) < 1e-9
    out.loss.backward()
    head = model.get_output_embeddings()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    if bias:
        assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0
    assert (head.weight is model.get_input_embeddings().weight) == tie
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[name]) < 1e-9, name


@pytest.mark.parametrize("kind,hyper", [("z", dict(a=0.5, b=3.0)), ("spherical", dict(eps=1e-3)),
                                        ("taylor", {}), ("mse", {})])
def test_kinds_and_hyperparameters_pass_through(kind, hyper):
    model = tiny_model("llama")
    ids, labels = batch()
    ref_loss, _ = reference_loss_and_grads(model, ids, labels, kind, **hyper)
    apply_spherical_loss(model, kind=kind, **hyper)
    assert rel_err(model(ids, labels=labels).loss, ref_loss, floor=1.0) < 1e-9


def test_eval_mode_and_no_labels_keep_the_logits():
    model = tiny_model("qwen2")
    ids, labels = batch()
    ref_logits = model(ids).logits.detach()
    ref_loss, _ = reference_loss_and_grads(model, ids, labels)
    apply_spherical_loss(model)
    assert torch.equal(model(ids).logits, ref_logits)  # training mode, no labels: untouched
    model.eval()
    out = model(ids, labels=labels)
    assert out.logits.shape == (*ids.shape, V) and torch.equal(out.logits, ref_logits)
    assert rel_err(out.loss, ref_loss) < 1e-9  # evaluation reports the trained loss
    assert torch.equal(model(ids).logits, ref_logits)
    as_tuple = model(ids, labels=labels, return_dict=False)
    assert rel_err(as_tuple[0], ref_loss) < 1e-9 and torch.equal(as_tuple[1], ref_logits)


def test_num_items_in_batch_sums_micro_batches_to_the_full_batch_mean():
    """Gradient accumulation as HF's Trainer does it: each micro-batch's loss is its sum over kept
    tokens divided by the whole batch's count, so the micro-batch losses (and gradients) add up to
    the full batch's mean."""
    model = tiny_model("llama")
    apply_spherical_loss(model)
    ids, labels = batch(B=4, ignored=7)
    full = model(ids, labels=labels).loss
    full.backward()
    full_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    count = (shifted(labels) != -100).sum()
    total = 0
    for half in (slice(0, 2), slice(2, 4)):
        part = model(ids[half], labels=labels[half], num_items_in_batch=count).loss
        part.backward()
        total = total + part.detach()
    assert rel_err(total, full.detach()) < 1e-12
    assert rel_err(model.lm_head.weight.grad, full_grad) < 1e-12
    as_int = model(ids[:2], labels=labels[:2], num_items_in_batch=int(count)).loss
    assert rel_err(as_int, model(ids[:2], labels=labels[:2], num_items_in_batch=count).loss) < 1e-15


def test_weight_statistics_are_computed_once_per_weight_version(monkeypatch):
    """The output embedding's Gram statistics (2·V·d² flops) are reused by the micro-batches of one
    step and by evaluation, recomputed after each optimizer step and after a `.data` write; the
    trained parameters equal those trained on the unpatched logits' loss."""
    from fusedtrain.spherical import stats_cache
    calls = []
    real = stats_cache.linear_spherical_stats
    monkeypatch.setattr(stats_cache, "linear_spherical_stats", lambda *a: calls.append(1) or real(*a))
    model = tiny_model("llama", tie=True)
    twin = copy.deepcopy(model)  # unpatched: trained on the oracle over its logits
    apply_spherical_loss(model)
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(twin.parameters(), lr=0.5)
    for step in range(3):
        ids, labels = batch(B=4, ignored=5)
        count = (shifted(labels) != -100).sum()
        for half in (slice(0, 2), slice(2, 4)):
            model(ids[half], labels=labels[half], num_items_in_batch=count).loss.backward()
        assert len(calls) == step + 1  # once for both micro-batches, again after each step
        _, grads = reference_loss_and_grads(twin, ids, labels)
        for name, p in twin.named_parameters():
            p.grad = grads.get(name)
        opt.step(), twin_opt.step()
        opt.zero_grad(), twin_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(p, q) < 1e-12, name
    model.eval()
    with torch.no_grad():
        first = model(ids, labels=labels).loss
        assert rel_err(model(ids, labels=labels).loss, first) == 0 and len(calls) == 4
        model.lm_head.weight.data.mul_(1.5)  # no version bump: the fingerprint sees it
        scaled = model(ids, labels=labels).loss
    assert len(calls) == 5
    logits = model(ids).logits
    ref = spherical_reference.spherical_loss(logits.reshape(-1, V), shifted(labels).reshape(-1), "z")
    assert rel_err(scaled, ref) < 1e-12


def test_shift_labels_and_ignore_index_follow_hf():
    model = tiny_model("gpt2")
    ids, labels = batch()
    apply_spherical_loss(model)
    plain = model(ids, labels=labels).loss
    assert rel_err(model(ids, labels=labels, shift_labels=shifted(labels)).loss, plain) < 1e-15
    relabelled = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    assert rel_err(model(ids, labels=relabelled, ignore_index=-1).loss, plain) < 1e-15
    apply_spherical_loss(model, ignore_index=-1)  # a default for the model; the forward's keyword wins
    assert rel_err(model(ids, labels=relabelled).loss, plain) < 1e-15
    with pytest.raises(ValueError, match="targets after the causal shift"):
        model(ids, labels=labels, logits_to_keep=2)


def lm_head_input(model, ids):
    """The hidden states the output embedding is given (its forward input), by a forward hook."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        model(ids)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("case", ["autocast", "bf16_model"])
def test_half_precision_loss_is_not_rounded_to_bf16(case):
    """HF's loss is float32 computed from upcast logits; ours is the op's fp32 accumulation, never a
    bf16-rounded value (up to 4e-3 off): under autocast and for a model held in bf16."""
    from fusedtrain import linear_spherical_loss
    model = tiny_model("llama", dtype=torch.float32 if case == "autocast" else torch.bfloat16)
    ids, labels = batch()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    with amp:
        hidden = lm_head_input(model, ids)
    apply_spherical_loss(model)
    with amp:
        loss = model(ids, labels=labels).loss
    assert loss.dtype == torch.float32
    # The oracle: float64 over exactly the bf16 values the kernels read.
    h64 = hidden.to(torch.bfloat16).double().reshape(-1, D)
    w64 = model.lm_head.weight.detach().to(torch.bfloat16).double()
    ref = linear_spherical_loss(h64, w64, shifted(labels).reshape(-1))
    assert rel_err(loss, ref) < 1e-5


def test_autocast_projects_in_the_autocast_dtype():
    model = tiny_model("llama", dtype=torch.float32)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
        assert logits.dtype == torch.bfloat16
        apply_spherical_loss(model)
        loss = model(ids, labels=labels).loss
    ref = spherical_reference.spherical_loss(logits.double().reshape(-1, V), shifted(labels).reshape(-1), "z")
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < 2e-2  # bf16 projection on both sides, rounded differently
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_remove_and_deepcopy():
    model = tiny_model("llama")
    ids, labels = batch()
    hf_loss = model(ids, labels=labels).loss
    apply_spherical_loss(model)
    assert is_patched(model) and "loss" in type(model(ids, labels=labels)).__dataclass_fields__
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone and clone.lm_head.forward.__self__ is clone.lm_head
    assert rel_err(clone(ids, labels=labels).loss, model(ids, labels=labels).loss) < 1e-15
    remove_spherical_loss(model)
    assert not is_patched(model)
    assert torch.equal(model(ids, labels=labels).loss, hf_loss)
    assert is_patched(clone)


def test_refusals_name_the_problem():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="unknown hyperparameters.*'reduction'"):
        apply_spherical_loss(model, reduction="sum")
    with pytest.raises(ValueError, match="a must be > 0"):
        apply_spherical_loss(model, a=-1.0)
    with pytest.raises(ValueError, match="kind"):
        apply_spherical_loss(model, kind="softmax")
    assert not is_patched(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_spherical_loss(nn.Linear(2, 2))
    model.loss_type = "ForMaskedLM"
    with pytest.raises(ValueError, match="not ForCausalLMLoss"):
        apply_spherical_loss(model)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    with pytest.raises(ValueError, match="final logit softcapping"):
        apply_spherical_loss(gemma)


def test_a_logit_scale_is_caught_at_the_first_forward():
    granite = transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, logits_scaling=4.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)).train()
    apply_spherical_loss(granite)
    ids, labels = batch()
    with pytest.raises(RuntimeError, match="transforms the logits"):
        granite(ids, labels=labels)


def test_trainer_with_frugal_and_gradient_accumulation(tmp_path):
    pytest.importorskip("accelerate")
    from fusedtrain.optim import FRUGAL

    model = tiny_model("llama", dtype=torch.float32)
    apply_spherical_loss(model)
    ids, labels = batch(B=8, T=9, ignored=10)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
                                          per_device_eval_batch_size=8, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    optimizer = FRUGAL(model.parameters(), lr=1e-2, density=0.5, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                                   optimizers=(optimizer, None))
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch to the forward
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.dim() == 2)
    # Evaluation reports the spherical loss of the trained model (one batch of all 8 rows).
    expected = model.eval()(ids, labels=labels).loss.item()
    assert abs(trainer.evaluate()["eval_loss"] - expected) < 1e-5 * expected


@pytest.mark.slow
def test_torch_compile_of_a_patched_model():
    """`torch.compile(model)` of a patched model trains with the same loss and gradients as eager (the
    patched forwards may break the graph; they must not change the result), under autocast too."""
    model = tiny_model("llama", dtype=torch.float32)
    ids, labels = batch()
    apply_spherical_loss(model)
    eager = model(ids, labels=labels).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model)
    loss = compiled(ids, labels=labels).loss
    loss.backward()
    assert rel_err(loss, eager) < 1e-6
    for name, p in model.named_parameters():
        assert rel_err(p.grad, grads[name]) < 1e-5, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_loss = compiled(ids, labels=labels).loss
        amp_eager = model(ids, labels=labels).loss
    assert amp_loss.dtype == torch.float32 and rel_err(amp_loss, amp_eager) < 1e-3
