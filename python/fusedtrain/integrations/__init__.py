"""Bridges to other libraries, each an optional extra imported only when its module is:

- :mod:`fusedtrain.integrations.transformers`: `apply_spherical_loss(model, kind="z", ...)` trains a
  Hugging Face causal LM with the fused linear spherical loss (needs `transformers`).
- :mod:`fusedtrain.integrations.sae_train`: `python -m fusedtrain sae train ...`, a sparse
  autoencoder trained on a Hugging Face model's activations (needs `transformers`, `safetensors`).

Nothing here is imported by `import fusedtrain`; the families never import this package.
"""
