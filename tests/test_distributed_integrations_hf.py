"""`apply_spherical_loss` on a tiny Llama sharded with FSDP2 (`fully_shard`, 2 gloo ranks, fp64): the
parameters after three steps of two gradient-accumulation micro-batches equal one process's on the
whole batch, and the output embedding's statistics are computed once per step when it is wrapped
itself (keyed on FSDP's sharded parameters: the gathered weight's storage is reused without a version
bump, so a key on it could go stale), at every call when only an enclosing `fully_shard` manages it."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distributed_utils import run_on_ranks  # noqa: E402

V, D, T = 37, 16, 9


def _model():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().train()


def _train(rank, world, wrap_head: bool, detect_data_writes: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fusedtrain.integrations.transformers import apply_spherical_loss
    from fusedtrain.spherical import stats_cache

    calls, counting = [], [False]  # computations of the sharded model's statistics only
    real = stats_cache.linear_spherical_stats
    stats_cache.linear_spherical_stats = lambda *a: (calls.append(1) if counting[0] else None) or real(*a)
    model, single = _model(), _model()
    apply_spherical_loss(model, detect_data_writes=detect_data_writes)
    apply_spherical_loss(single)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if wrap_head:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (model, single)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, V, (2, world, T), generator=g)  # micro-batch, rank, tokens
        labels = ids.clone()
        labels[:, :, :2] = -100
        count = int((labels[..., 1:] != -100).sum())  # HF's num_items_in_batch over the whole step
        for micro in range(2):
            single(ids[micro], labels=labels[micro], num_items_in_batch=count).loss.backward()
            # Each rank's loss is its share of the sum over the step's tokens; FSDP averages the
            # gradients over the ranks, hence the factor `world`.
            counting[0] = True
            loss = model(ids[micro, rank:rank + 1], labels=labels[micro, rank:rank + 1], num_items_in_batch=count).loss
            counting[0] = False
            (loss * world).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    errors = {name: ((p.full_tensor() - q).norm() / q.norm()).item()
              for (name, p), q in zip(model.named_parameters(), single.parameters())}
    moved = all(not torch.equal(q, r) for q, r in zip(single.parameters(), _model().parameters()))
    return errors, len(calls), moved


def _all(rank, world):
    return {(wrap, detect): _train(rank, world, wrap, detect)
            for wrap, detect in ((True, False), (True, True), (False, False))}


def test_fsdp2_training_equals_one_process_and_caches_per_step():
    for results in run_on_ranks(_all, 2):
        for (wrap_head, detect), (errors, calls, moved) in results.items():
            assert moved
            assert max(errors.values()) < 1e-12, (wrap_head, detect, errors)
            # Wrapped: once per optimizer step (3), the second micro-batch reuses them. Managed by the
            # model's fully_shard only: every forward (2 per step), nothing to key on.
            assert calls == (3 if wrap_head else 6), (wrap_head, detect, calls)
