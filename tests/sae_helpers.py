"""Helpers shared by the SAE test files (test_sae.py, test_sae_routing.py)."""
from __future__ import annotations

import torch

from fusedtrain.reference import sae as ref


def reference_csr(pre, routing, param, theta=None):
    return ref.csr_from_dense(pre, ref.route_mask(pre, routing, param, theta))


def make_pre(B, F, device, dtype, ties=False):
    pre = torch.randn(B, F, dtype=torch.float64)
    if ties:  # few distinct values: ties at every cutoff
        pre = (pre * 2).round() / 2
    return pre.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The raw ops' reading of hostile index values (csrc/sae/sae.h), modelled in plain Python: offsets
# are clamped to [0, nnz] and made non-decreasing; an entry outside every row, or whose feature
# (perm, token) is outside its table, contributes nothing.

def read_offsets(ptr: list[int], nnz: int) -> list[int]:
    out, top = [], 0
    for p in ptr:
        top = max(top, min(max(p, 0), nnz))
        out.append(top)
    return out


def row_of_entries(row_ptr: list[int], nnz: int) -> list[int]:
    """Each entry's row: -1 before row 0, B after the last row."""
    P = read_offsets(row_ptr, nnz)
    B = len(P) - 1
    rows = []
    for j in range(nnz):
        b = sum(1 for p in P if p <= j) - 1
        rows.append(min(b, B))
    return rows


def model_gather_rows(row_ptr, feature, value, table, bias=None):
    nnz, (R, d) = len(feature), table.shape
    P = read_offsets(row_ptr, nnz)
    out = torch.zeros(len(P) - 1, d, dtype=torch.float64)
    for b in range(len(P) - 1):
        for j in range(P[b], P[b + 1]):
            if 0 <= feature[j] < R:
                out[b] += float(value[j]) * table[feature[j]].double()
    return out + (bias.double() if bias is not None else 0)


def model_sampled_dot(row_ptr, feature, grad, table):
    nnz, R = len(feature), table.shape[0]
    rows = row_of_entries(row_ptr, nnz)
    B = len(row_ptr) - 1
    out = torch.zeros(nnz, dtype=torch.float64)
    for j in range(nnz):
        if 0 <= rows[j] < B and 0 <= feature[j] < R:
            out[j] = (grad[rows[j]].double() * table[feature[j]].double()).sum()
    return out


def model_csc(row_ptr, feature, num_cols):
    nnz = len(feature)
    rows = row_of_entries(row_ptr, nnz)
    B = len(row_ptr) - 1
    key = [f if 0 <= rows[j] < B and 0 <= f < num_cols else num_cols for j, f in enumerate(feature)]
    perm = sorted(range(nnz), key=lambda j: (key[j], j))
    col_ptr = [sum(1 for k in key if k < f) for f in range(num_cols + 1)]
    return col_ptr, perm, [rows[j] for j in perm]


def model_segment_sum(col_ptr, perm, token, coef, src):
    nnz, (B, d) = len(perm), src.shape
    C = read_offsets(col_ptr, nnz)
    out = torch.zeros(len(C) - 1, d, dtype=torch.float64)
    total = torch.zeros(len(C) - 1, dtype=torch.float64)
    for f in range(len(C) - 1):
        for p in range(C[f], C[f + 1]):
            j, b = perm[p], token[p]
            if 0 <= j < nnz and 0 <= b < B:
                out[f] += float(coef[j]) * src[b].double()
                total[f] += float(coef[j])
    return out, total


def run_isolated(code: str, timeout: float = 120.0):
    """Runs `code` in a fresh interpreter (tests/ on the path), so that a crash is a failed test and
    not a dead test run. Returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
