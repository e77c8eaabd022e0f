"""`SparseAutoencoder.save_to_disk` / `load_from_disk` (sae/persistence.py) and `SAEConfig`: exact round
trips for every routing, sparsify 1.3.3 loading what we save (and we what it saves) with the same TopK
encoding, and clear errors for folders we cannot read."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("safetensors")

from fusedtrain.sae import ROUTINGS, SparseAutoencoder  # noqa: E402
from fusedtrain.sae.config import SAEConfig  # noqa: E402
from fusedtrain.sae.persistence import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE  # noqa: E402

needs_sparsify = pytest.mark.skipif(importlib.util.find_spec("sparsify") is None, reason="needs sparsify")


def trained_sae(routing="topk", dtype=torch.float64, d=12, F=40, k=5, steps=3, **kw):
    """An SAE with non-default hyperparameters and buffers moved by a few training calls."""
    sae = SparseAutoencoder(d, F, routing, k, auxk_alpha=0.125, dead_tokens_threshold=7, threshold_decay=0.9,
                            dtype=dtype, **kw)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    for _ in range(steps):
        sae(torch.randn(16, d, dtype=dtype))
    return sae


@pytest.mark.parametrize("routing", ROUTINGS + ("threshold",))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_round_trip_is_exact(tmp_path, routing, dtype):
    extra = dict(theta=torch.rand(40) / 2) if routing == "threshold" else {}  # per latent: restored exactly
    sae = trained_sae(routing, dtype, m=3 if routing == "feature_choice" else None, **extra)
    sae.save_to_disk(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_FILE, WEIGHTS_FILE, STATE_FILE])
    loaded = SparseAutoencoder.load_from_disk(tmp_path)
    assert SAEConfig.from_module(loaded) == SAEConfig.from_module(sae)
    original, copy = sae.state_dict(), loaded.state_dict()
    assert original.keys() == copy.keys()
    for name in original:
        assert original[name].dtype == copy[name].dtype and torch.equal(original[name], copy[name]), name
    assert loaded.W_enc.t().is_contiguous()  # the layout whose backward rows are written whole
    x = torch.randn(9, sae.d_in, dtype=dtype)
    sae.eval(), loaded.eval()  # eval: threshold routing with the loaded thresholds for the batch routings
    a, b = sae.encode(x), loaded.encode(x)
    assert torch.equal(a.row_ptr, b.row_ptr) and torch.equal(a.feature, b.feature) and torch.equal(a.value, b.value)


def test_load_to_device_and_dtype(tmp_path):
    sae = trained_sae(dtype=torch.float64)
    sae.save_to_disk(tmp_path)
    loaded = SparseAutoencoder.load_from_disk(tmp_path, device="cpu", dtype=torch.float32)
    assert loaded.W_dec.dtype == torch.float32 and loaded.W_dec.device.type == "cpu"
    assert torch.equal(loaded.W_dec, sae.W_dec.float())
    assert loaded.threshold.dtype == torch.float32 and torch.equal(loaded.num_tokens_since_fired,
                                                                   sae.num_tokens_since_fired)


def dense_latents(row_ptr_or_values, indices, F, B):
    """(B, F) latent matrix from sparsify's (B, k) values and indices."""
    return torch.zeros(B, F, dtype=row_ptr_or_values.dtype).scatter_(1, indices, row_ptr_or_values)


@needs_sparsify
@pytest.mark.parametrize("k", [1, 5, 40])  # 40 = F: most tokens have fewer than k positive latents
def test_sparsify_loads_ours_and_encodes_the_same(tmp_path, k):
    from sparsify import SparseCoder

    sae = trained_sae("topk", torch.float64, k=k)
    sae.save_to_disk(tmp_path)
    coder = SparseCoder.load_from_disk(tmp_path)
    assert coder.cfg.k == k and coder.num_latents == sae.num_latents and coder.d_in == sae.d_in
    assert coder.dtype == torch.float64
    x = torch.randn(33, sae.d_in, dtype=torch.float64)
    theirs = coder.encode(x)
    ours = sae.encode(x)
    their_dense = dense_latents(theirs.top_acts, theirs.top_indices, sae.num_latents, x.shape[0])
    our_dense = ours.to_dense(sae.num_latents)
    assert torch.equal(their_dense > 0, our_dense > 0)  # the same kept latents
    assert (their_dense - our_dense).abs().max() <= 1e-12 * our_dense.abs().max()
    # sparsify's decode is a Triton kernel (GPU only): decode its latents with its loaded weights densely.
    their_out = their_dense @ coder.W_dec + coder.b_dec
    assert (their_out - sae.decode(ours)).abs().max() <= 1e-12 * their_out.abs().max()


@needs_sparsify
def test_we_load_what_sparsify_saves(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(10, SparseCoderConfig(num_latents=30, k=4), dtype=torch.float64)
    with torch.no_grad():
        coder.encoder.bias.normal_()
        coder.b_dec.normal_()
    coder.save_to_disk(tmp_path)
    sae = SparseAutoencoder.load_from_disk(tmp_path)
    assert (sae.d_in, sae.num_latents, sae.routing, sae.k) == (10, 30, "topk", 4)
    assert torch.equal(sae.W_enc, coder.encoder.weight.t()) and torch.equal(sae.b_dec, coder.b_dec)
    x = torch.randn(20, 10, dtype=torch.float64)
    theirs = coder.encode(x)
    their_dense = dense_latents(theirs.top_acts, theirs.top_indices, 30, 20)
    assert torch.equal(their_dense > 0, sae.encode(x).to_dense(30) > 0)


def write_cfg(path, cfg):
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(cfg, f)


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        SparseAutoencoder.load_from_disk(tmp_path)
    sae = trained_sae()
    sae.save_to_disk(tmp_path)
    cfg = json.load(open(tmp_path / CONFIG_FILE))
    for field, value, message in (("skip_connection", True, "skip_connection"), ("activation", "groupmax", "activation"),
                                  ("transcode", True, "transcode")):
        write_cfg(tmp_path, {k: v for k, v in {**cfg, field: value}.items() if k != "fusedtrain"})
        with pytest.raises(ValueError, match=message):
            SparseAutoencoder.load_from_disk(tmp_path)
    newer = json.loads(json.dumps(cfg))
    newer["fusedtrain"]["format_version"] = 99
    write_cfg(tmp_path, newer)
    with pytest.raises(ValueError, match="newer"):
        SparseAutoencoder.load_from_disk(tmp_path)
    extra = json.loads(json.dumps(cfg))
    extra["fusedtrain"]["config"]["sparsity_penalty"] = 1.0
    write_cfg(tmp_path, extra)
    with pytest.raises(ValueError, match="unknown SAE hyperparameters.*sparsity_penalty"):
        SparseAutoencoder.load_from_disk(tmp_path)
    wrong = json.loads(json.dumps(cfg))
    wrong["fusedtrain"]["config"]["num_latents"] = 41
    write_cfg(tmp_path, wrong)
    with pytest.raises(ValueError, match="num_latents = 41"):
        SparseAutoencoder.load_from_disk(tmp_path)
    write_cfg(tmp_path, cfg)
    other = SparseAutoencoder(12, 41, dtype=torch.float64)
    other.save_to_disk(tmp_path / "other")
    os.replace(tmp_path / "other" / STATE_FILE, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="buffer 'num_tokens_since_fired' has shape"):
        SparseAutoencoder.load_from_disk(tmp_path)


def test_config_mirrors_the_constructor():
    """Every constructor argument but the runtime ones is a field, with the constructor's default: a
    new hyperparameter that is not added to SAEConfig would not be saved."""
    import inspect

    constructor = inspect.signature(SparseAutoencoder.__init__).parameters
    arguments = {n: p for n, p in constructor.items()
                 if n != "self" and n not in SAEConfig.RUNTIME_ARGUMENTS + SAEConfig.STATE_ARGUMENTS}
    assert set(arguments) == set(SAEConfig.field_names())
    defaults = {f.name: f.default for f in __import__("dataclasses").fields(SAEConfig)}
    for name, p in arguments.items():
        if p.default is not p.empty:
            assert defaults[name] == p.default, name
    config = SAEConfig(d_in=6, num_latents=10, routing="mutual_choice", k=3, k_aux=2)
    sae = SparseAutoencoder(**config.to_kwargs())
    assert SAEConfig.from_module(sae) == config
    assert SAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_refuses_a_constructor_argument_it_does_not_record():
    class WithExtra(SparseAutoencoder):
        def __init__(self, d_in, num_latents, routing="topk", k=32, *, temperature=1.0, **kw):
            super().__init__(d_in, num_latents, routing, k, **kw)
            self.temperature = temperature

    with pytest.raises(TypeError, match=r"\['temperature'\].*add them as fields"):
        SAEConfig.from_module(WithExtra(4, 8, k=2))
