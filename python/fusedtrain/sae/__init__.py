"""Top-k / feature-choice / mutual-choice / threshold SAE routing, the fused encoder, sparse decode with
sparse backward, and the `SparseAutoencoder` module (maths: docs/sae.md).

Every routing returns one format, :class:`SparseActs`: CSR by token (`row_ptr (B+1,)`, `feature
(nnz,)` int64 ascending within a row, `value (nnz,)`), holding only entries with pre > 0. TopK also
comes in sparsify's dense `(B, k)` form (:func:`topk_route` with `dense=True`).

The fused :func:`sae_encode` computes the pre-activations with one GEMM, routes them and frees them:
backward needs only the kept entries (`dW_enc`, `db_enc`, `dx` are sparse-dense products aggregated
per feature in a fixed order), so the B x F matrix is never kept and no dense B x F gradient is made.
:func:`sparse_decode` gathers decoder rows with fp32 accumulation; its backward computes `dvalue` as
dot products at the kept entries only and `dW_dec` per feature (deterministic).
`SparseAutoencoder(..., process_group=g)` splits the latents over the ranks of `g` (sharded.py).
"""
from . import registration  # noqa: F401  (attaches fake kernels and autograd to the compiled ops)
from .checks import ROUTINGS
from .codec import sae_encode, sparse_decode
from .module import ForwardOutput, SparseAutoencoder
from .sharded import LatentShardedSparseAutoencoder  # also registers it: SparseAutoencoder(..., process_group=g)
from .routing import feature_choice_route, mutual_choice_route, threshold_route, topk_route
from .types import SparseActs, TopKOutput

__all__ = ["ROUTINGS", "SparseActs", "TopKOutput", "topk_route", "feature_choice_route", "mutual_choice_route",
           "threshold_route", "sae_encode", "sparse_decode", "SparseAutoencoder", "ForwardOutput",
           "LatentShardedSparseAutoencoder"]
