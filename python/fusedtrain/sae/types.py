"""The SAE family's data types: `SparseActs` (CSR by token) and sparsify's dense `TopKOutput`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference as _reference


class SparseActs(NamedTuple):
    """Sparse latent activations, CSR by token: row b holds `feature[row_ptr[b]:row_ptr[b+1]]`."""
    row_ptr: torch.Tensor
    feature: torch.Tensor
    value: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.row_ptr.numel() - 1

    def token(self) -> torch.Tensor:
        """The token (row) of every stored entry, (nnz,) int64. A malformed row_ptr is read as the
        ops read it (docs/sae.md): an entry in no row gets -1 (before row 0) or B (after the last)."""
        return _reference.entry_tokens(self.row_ptr, self.feature.numel())

    def to_dense(self, num_latents: int) -> torch.Tensor:
        """The (B, num_latents) dense activations (differentiable in `value`)."""
        return _reference.dense_from_csr(self.row_ptr, self.feature, self.value, num_latents)


class TopKOutput(NamedTuple):
    """TopK in sparsify's `EncoderOutput` shape: `(B, k)` rectified values and their int64 indices."""
    top_acts: torch.Tensor
    top_indices: torch.Tensor
