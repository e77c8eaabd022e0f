"""The floating dtypes every op accepts, and the dtype each accumulates in."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32, bf16 and fp16 accumulate in fp32 (as the kernels do)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
