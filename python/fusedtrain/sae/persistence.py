"""Save and load a `SparseAutoencoder` in sparsify's folder layout (docs/integrations.md):

    cfg.json                       sparsify's SparseCoderConfig fields + "d_in", and ours under "fusedtrain"
    sae.safetensors                encoder.weight (F, d), encoder.bias (F,), W_dec (F, d), b_dec (d,)
    fusedtrain_state.safetensors   our buffers (dead-latent counters, thresholds)

sparsify (1.3.3) reads `cfg.json` with `drop_extra_fields=True`, so our "fusedtrain" entry is ignored
there, but loads `sae.safetensors` strictly (any extra tensor is an error): the buffers therefore go
in a file of their own. sparsify encodes with per-token TopK `k`, so a `routing="topk"` SAE encodes
the same in both; for the batch-level routings sparsify's encoding is TopK with the same `k`.

A folder saved by sparsify itself (no "fusedtrain" entry) loads as a TopK SAE of its `k`.
"""
from __future__ import annotations

import json
import os

import torch

from .config import SAEConfig

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
STATE_FILE = "fusedtrain_state.safetensors"
FORMAT_VERSION = 1  # of our "fusedtrain" entry in cfg.json
_OURS = "fusedtrain"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # an optional extra
        raise ImportError("saving and loading a SparseAutoencoder needs the `safetensors` package "
                          "(pip install safetensors)") from exc
    return safetensors.torch


def sparsify_config(config: SAEConfig) -> dict:
    """The fields of sparsify's SparseCoderConfig (plus "d_in") that describe this SAE."""
    fields = {"activation": "topk", "normalize_decoder": True, "num_latents": config.num_latents, "k": config.k,
              "multi_topk": False, "skip_connection": False, "transcode": False}
    if config.num_latents % config.d_in == 0:  # informative only: sparsify uses num_latents when it is set
        fields["expansion_factor"] = config.num_latents // config.d_in
    return {**fields, "d_in": config.d_in}


def save_sae(sae, path, metadata: dict | None = None) -> None:
    """Write `sae` to the folder `path` (created if needed; the three files are overwritten).
    metadata: JSON-ready facts to keep with it (e.g. how it was trained), under cfg.json's
    ["fusedtrain"]["metadata"]."""
    st = _safetensors()
    config = SAEConfig.from_module(sae)
    os.makedirs(path, exist_ok=True)
    weights = {"encoder.weight": sae.W_enc.detach().t(), "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    st.save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(path, WEIGHTS_FILE),
                 metadata={"format": "pt"})
    buffers = {name: b.detach().contiguous() for name, b in sae.named_buffers()}
    st.save_file(buffers, os.path.join(path, STATE_FILE), metadata={"format": "pt"})
    ours = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "state_file": STATE_FILE}
    if metadata:
        ours["metadata"] = metadata
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({**sparsify_config(config), _OURS: ours}, f, indent=2)
        f.write("\n")


def _config_from_sparsify(cfg: dict, where: str) -> SAEConfig:
    """A sparsify-written cfg.json as our config (a TopK SAE), refusing what we cannot encode."""
    for name, unsupported in (("activation", lambda v: v != "topk"), ("skip_connection", bool),
                              ("transcode", bool)):
        if name in cfg and unsupported(cfg[name]):
            raise ValueError(f"{where}: {name} = {cfg[name]!r} is a sparsify feature SparseAutoencoder lacks "
                             f"(it loads TopK autoencoders without skip connection)")
    if "d_in" not in cfg:
        raise ValueError(f"{where} has no 'd_in' (not an SAE config)")
    d_in = cfg["d_in"]
    num_latents = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    return SAEConfig(d_in=d_in, num_latents=num_latents, routing="topk", k=cfg.get("k", 32))


def load_sae(cls, path, device=None, dtype: torch.dtype | None = None):
    """Read a folder written by `save_sae` (or by sparsify's `SparseCoder.save_to_disk`) as `cls`.
    device: where to put it (default CPU); dtype: convert the weights (default: as saved)."""
    st = _safetensors()
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"path: no {CONFIG_FILE} in {path!r} (not a saved SAE folder)")
    with open(config_path) as f:
        cfg = json.load(f)
    ours = cfg.get(_OURS)
    if ours is None:
        config = _config_from_sparsify(cfg, config_path)
    else:
        if ours.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{config_path} was written in format {ours.get('format_version')} by a newer "
                             f"fusedtrain; this one reads format {FORMAT_VERSION}")
        config = SAEConfig.from_dict(ours.get("config"), f"{config_path}['{_OURS}']['config']")
    device = torch.device("cpu") if device is None else torch.device(device)
    weights = st.load_file(os.path.join(path, WEIGHTS_FILE), device=str(device))
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    kwargs = config.to_kwargs()
    d_in, num_latents, routing, k = (kwargs.pop(name) for name in ("d_in", "num_latents", "routing", "k"))
    state_path = os.path.join(path, ours.get("state_file", STATE_FILE)) if ours is not None else None
    if routing == "threshold":  # theta lives in the saved `threshold` buffer: a placeholder until it loads
        if state_path is None or not os.path.isfile(state_path):
            raise FileNotFoundError(f"path: a threshold-routing SAE keeps theta in {STATE_FILE}, missing in {path!r}")
        kwargs["theta"] = 0.0
    sae = cls.from_sparsify_state_dict(weights, routing, k, **kwargs)
    if (sae.d_in, sae.num_latents) != (d_in, num_latents):
        raise ValueError(f"{path}: the weights are of d_in = {sae.d_in}, num_latents = {sae.num_latents} but "
                         f"{CONFIG_FILE} says d_in = {d_in}, num_latents = {num_latents}")
    if state_path is not None and os.path.isfile(state_path):
        _load_buffers(sae, st.load_file(state_path, device=str(device)), state_path)
    return sae


def _load_buffers(sae, state: dict, where: str) -> None:
    buffers = dict(sae.named_buffers())
    unknown = sorted(set(state) - set(buffers))
    if unknown:
        raise ValueError(f"{where} holds buffers {unknown} that {type(sae).__name__} does not have")
    with torch.no_grad():
        for name, value in state.items():  # a buffer missing from the file keeps its initial value
            if value.shape != buffers[name].shape:
                raise ValueError(f"{where}: buffer {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(buffers[name].shape)}")
            buffers[name].copy_(value)
