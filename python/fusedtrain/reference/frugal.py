"""Pure-PyTorch reference of the FRUGAL optimizer (spec/frugal.md), written from the spec.

Two levels, mirroring the compiled code:
- `frugal_step_`: the reference of the fused op `fusedtrain::frugal_step_`: same arguments, same
  in-place effect, plain tensor ops (gathers, scatters, full-size intermediates), float64-capable.
- `FRUGALReference`: the optimizer. It owns everything that is not element-wise: the subspace
  choice (random columns/rows/blocks, SVD or random semi-orthogonal bases), when it is refreshed,
  the state and its `state_dict`. It hands every step's element-wise work to `_step_fn`, which is
  `frugal_step_` here and the compiled op in `fusedtrain.optim.FRUGAL`, so the two optimizers draw
  the same subspaces from the same seed and differ only in the fused update.

Update of a projectable W (m×n) with gradient G (spec): G_full = P(G); u = AdamW direction of
G_full with moments kept in the subspace; G_free = G − P⁻¹(G_full); u_free = sign(G_free)
(signsgd), G_free (sgd) or 0 (none); W ← W·(1 − lr·wd) − lr·P⁻¹(u) − lr·free_lr_scale·u_free.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

# Kinds of per-tensor update of the fused op (csrc/frugal/frugal_math.h).
DENSE, COLUMNS, ROWS, FREE, RESIDUAL = range(5)

PROJECTIONS = ("columns", "rows", "block", "svd", "random")
FREE_UPDATES = ("signsgd", "sgd", "none")
BLOCK_ORDERS = ("random", "ascending", "descending")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The (rows, cols) view of a tensor: dim >= 2 as (size(0), rest), 1-D as one row."""
    if p.dim() < 2:
        return 1, p.numel()
    return p.shape[0], math.prod(p.shape[1:])


def subspace_size(density: float, size: int) -> int:
    """round(density·size), halves rounded up (Python's round() would round them to even)."""
    return min(size, int(math.floor(density * size + 0.5)))


def free_direction(g: torch.Tensor, free_update: str) -> torch.Tensor:
    if free_update == "signsgd":
        return torch.sign(g)
    if free_update == "sgd":
        return g
    return torch.zeros_like(g)


def frugal_step_(params, grads, exp_avgs, exp_avg_sqs, indices, kinds, steps, *, lr, beta1, beta2,
                 eps, weight_decay, free_update="signsgd", free_lr_scale=1.0, residual_bases=None,
                 dense_updates=None) -> None:
    """Reference of `fusedtrain.frugal_step_` (see there for the arguments)."""
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        kind = int(kinds[i])
        acc = _acc_dtype(p.dtype)
        rows, cols = matrix_shape(p)
        W = p.detach().reshape(rows, cols).to(acc)
        G = grads[i].reshape(rows, cols).to(acc)
        decay = 1.0 - lr * weight_decay
        free_scale = lr * free_lr_scale
        if kind == RESIDUAL:
            base = residual_bases[i].reshape(rows, cols).to(acc)
            update = dense_updates[i].reshape(rows, cols).to(acc)
            new = W * decay - lr * update - free_scale * free_direction(G - base, free_update)
            p.detach().copy_(new.reshape(p.shape))
            continue
        new = W * decay - free_scale * free_direction(G, free_update)
        if kind in (DENSE, COLUMNS, ROWS):
            if kind == DENSE:
                select = (slice(None), slice(None))
            else:
                idx = indices[i].long()
                select = (slice(None), idx) if kind == COLUMNS else (idx, slice(None))
            Gs, Ws = G[select], W[select]
            m = exp_avgs[i].reshape(Gs.shape).to(acc)
            v = exp_avg_sqs[i].reshape(Gs.shape).to(acc)
            # torch.optim.AdamW's order of operations.
            m = torch.lerp(m, Gs, 1.0 - beta1)
            v = v * beta2 + (1.0 - beta2) * Gs * Gs
            t = int(steps[i])
            step_size = lr / (1.0 - beta1 ** t)
            bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
            new[select] = Ws * decay - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
            exp_avgs[i].copy_(m.reshape(exp_avgs[i].shape))
            exp_avg_sqs[i].copy_(v.reshape(exp_avg_sqs[i].shape))
        p.detach().copy_(new.reshape(p.shape))


# ---------------------------------------------------------------------------------------------
# Subspace choice (shared with fusedtrain.optim.FRUGAL: same generator, same draws)

def select_indices(size: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices of [0, size), uniformly at random, sorted, int32 (on the CPU)."""
    return torch.randperm(size, generator=generator)[:k].sort().values.to(torch.int32)


def svd_basis(G: torch.Tensor, r: int, right: bool) -> torch.Tensor:
    """Top-r right (n×r) or left (m×r) singular vectors of G, in fp32 (fp64 for fp64)."""
    U, _, Vh = torch.linalg.svd(G.to(_acc_dtype(G.dtype)), full_matrices=False)
    return Vh[:r].T.contiguous() if right else U[:, :r].contiguous()


def random_basis(size: int, r: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random semi-orthogonal size×r matrix (Q of a Gaussian's QR), drawn on the CPU."""
    gauss = torch.randn(size, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))
    return q.to(dtype)


def block_selection(count: int, k: int, refresh: int, order: str, generator: torch.Generator) -> set[int]:
    """Which of `count` tensors are state-full after refresh number `refresh` (0, 1, ...).

    random: k drawn afresh; ascending/descending: the next k in (reverse) order, cycling (BAdam).
    """
    if count == 0 or k == 0:
        return set()
    if order == "random":
        return set(torch.randperm(count, generator=generator)[:k].tolist())
    chosen = {(refresh * k + i) % count for i in range(k)}
    return chosen if order == "ascending" else {count - 1 - c for c in chosen}


def _check_number(name, value, group_id, low=None, high=None, *, low_open=False, high_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        span = f" in {lo}{low}, {high}{hi}" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{span}, got {value!r} (param group {group_id})")


def check_group(group: dict, group_id: int) -> None:
    """Validate one param group's hyperparameters; the error names the bad one."""
    _check_number("lr", group["lr"], group_id, 0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r} (param group {group_id})")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        _check_number(name, beta, group_id, 0.0, 1.0, high_open=True)
    _check_number("eps", group["eps"], group_id, 0.0)
    _check_number("weight_decay", group["weight_decay"], group_id, 0.0)
    _check_number("density", group["density"], group_id, 0.0, 1.0)
    _check_number("free_lr_scale", group["free_lr_scale"], group_id, 0.0)
    if group["proj"] is not None and group["proj"] not in PROJECTIONS:
        raise ValueError(f"proj must be one of {PROJECTIONS} or None (plain AdamW), got {group['proj']!r} "
                         f"(param group {group_id})")
    gap = group["update_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"update_gap must be an int >= 1, got {gap!r} (param group {group_id})")
    if not isinstance(group["reset_state"], bool):
        raise ValueError(f"reset_state must be a bool, got {group['reset_state']!r} (param group {group_id})")
    if group["free_update"] not in FREE_UPDATES:
        raise ValueError(f"free_update must be one of {FREE_UPDATES}, got {group['free_update']!r} "
                         f"(param group {group_id})")
    if group["block_order"] not in BLOCK_ORDERS:
        raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {group['block_order']!r} "
                         f"(param group {group_id})")
    for p in group["params"]:
        if p.is_complex():
            raise ValueError(f"FRUGAL does not support complex parameters (a {p.dtype} tensor of shape "
                             f"{tuple(p.shape)} in param group {group_id}); view it as real with "
                             "torch.view_as_real first")
        if not p.is_floating_point():
            raise ValueError(f"FRUGAL optimizes floating-point parameters, got {p.dtype} "
                             f"(param group {group_id})")


class FRUGALReference(torch.optim.Optimizer):
    """FRUGAL (Zmushko et al., 2025): AdamW in a subspace of density ρ, signSGD outside it.

    Arguments as `fusedtrain.optim.FRUGAL`. Per param group: `proj` in PROJECTIONS, or None for a
    group on plain AdamW (embeddings, output head); tensors of fewer than 2 dimensions always get
    AdamW. `block_order` ("random", "ascending", "descending") orders the "block" projection.
    """

    _step_fn = staticmethod(frugal_step_)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, density: float = 0.25, proj: str | None = "columns",
                 update_gap: int = 200, reset_state: bool = True, free_update: str = "signsgd",
                 free_lr_scale: float = 1.0, seed: int | None = None, block_order: str = "random"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, density=density, proj=proj, update_gap=update_gap,
                        reset_state=reset_state, free_update=free_update, free_lr_scale=free_lr_scale,
                        block_order=block_order)
        if seed is None:  # drawn from torch's global generator: torch.manual_seed makes runs repeatable
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        # One CPU generator draws every subspace (any device), so CPU and CUDA runs choose alike.
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_group(group, len(self.param_groups) - 1)
        # Steps this group has taken: the "block" projection refreshes on it. In the group dict so
        # that state_dict() carries it.
        group.setdefault("block_step", 0)

    # -----------------------------------------------------------------------------------------
    # state_dict: torch's (per-param state, param groups) plus the subspace generator

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["frugal_generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("frugal_generator", None)
        # torch casts every state tensor of a floating param to the param's dtype: the int32
        # indices are set aside and restored as they are (only moved to the param's device).
        indices = {pid: s["indices"] for pid, s in state_dict["state"].items() if "indices" in s}
        state_dict["state"] = {pid: {k: v for k, v in s.items() if k != "indices"}
                               for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, idx in indices.items():
            self.state[by_id[pid]]["indices"] = idx.to(device=by_id[pid].device, dtype=torch.int32)
        if generator is not None:
            self._generator.set_state(generator)

    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"FRUGAL does not support sparse gradients (param of shape "
                                   f"{tuple(p.shape)}); use dense gradients (e.g. nn.Embedding(sparse=False))")
        if group["proj"] == "block" and group["block_step"] % group["update_gap"] == 0:
            self._refresh_blocks(group)
        group["block_step"] += 1
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), free_update=group["free_update"],
                     free_lr_scale=float(group["free_lr_scale"]))
        buckets = defaultdict(lambda: defaultdict(list))
        for p in params:
            work = self._prepare(p, group)
            if work["kinds"] == RESIDUAL:
                # Applied at once: its two param-size temporaries are freed before the next
                # tensor's are made (peak memory of one tensor's, not the whole group's).
                self._apply({key: [value] for key, value in work.items()}, **hyper)
                continue
            bucket = buckets[(p.device, p.dtype)]
            for key, value in work.items():
                bucket[key].append(value)
        for bucket in buckets.values():  # one fused call per (device, dtype)
            self._apply(bucket, **hyper)

    def _apply(self, bucket: dict, **hyper) -> None:
        params = bucket["params"]
        # The fused op wants contiguous params; a non-contiguous one is updated through a copy.
        targets = [p if p.is_contiguous() else p.contiguous() for p in params]
        self._step_fn(targets, bucket["grads"], bucket["exp_avgs"], bucket["exp_avg_sqs"],
                      bucket["indices"], bucket["kinds"], bucket["steps"],
                      residual_bases=bucket["residual_bases"], dense_updates=bucket["dense_updates"],
                      **hyper)
        for p, t in zip(params, targets):
            if t is not p:
                p.copy_(t)

    def _refresh_blocks(self, group: dict) -> None:
        candidates = [p for p in group["params"] if p.dim() >= 2]
        k = subspace_size(group["density"], len(candidates))
        refresh = group["block_step"] // group["update_gap"]
        chosen = block_selection(len(candidates), k, refresh, group["block_order"], self._generator)
        # An unchanged selection (density 1, say) is no new subspace: its moments are kept.
        unchanged = all(self.state[p].get("active", False) == (i in chosen) for i, p in enumerate(candidates))
        for i, p in enumerate(candidates):
            state = self.state[p]
            active = i in chosen
            keep = active and state.get("active", False) and (unchanged or not group["reset_state"])
            if not keep:  # inactive tensors hold no state; newly active ones start from zero
                for key in ("exp_avg", "exp_avg_sq", "adam_step"):
                    state.pop(key, None)
            state["active"] = active

    def _empties(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty placeholders for the op's unused list entries, made once per (device, dtype):
        allocating five per tensor per step costs more host time than a GPU step."""
        cache = self.__dict__.setdefault("_empty_cache", {})
        key = (p.device, p.dtype)
        if key not in cache:
            cache[key] = (p.new_empty(0), p.new_empty(0, dtype=torch.int32))
        return cache[key]

    @staticmethod
    def _zeros_moments(state: dict, like: torch.Tensor, shape) -> None:
        state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["adam_step"] = 0

    def _prepare(self, p: torch.Tensor, group: dict) -> dict:
        """This step's work for param p (an entry of each of the fused op's lists)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        refresh = state["step"] % group["update_gap"] == 0
        state["step"] += 1
        grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
        empty, no_indices = self._empties(p)
        work = dict(params=p, grads=grad, exp_avgs=empty, exp_avg_sqs=empty, indices=no_indices,
                    residual_bases=empty, dense_updates=empty, kinds=FREE, steps=0)
        proj = group["proj"]
        rows, cols = matrix_shape(p)
        if proj is None or p.dim() < 2 or (proj == "block" and state.get("active", False)):
            if "exp_avg" not in state:
                self._zeros_moments(state, p, p.shape)
            state["adam_step"] += 1
            work.update(kinds=DENSE, exp_avgs=state["exp_avg"], exp_avg_sqs=state["exp_avg_sq"],
                        steps=state["adam_step"])
        elif proj in ("columns", "rows"):
            size = cols if proj == "columns" else rows
            k = subspace_size(group["density"], size)
            if refresh:
                state["indices"] = select_indices(size, k, self._generator).to(p.device)
                # A full subspace (density 1) is the same at every refresh: no reset, so that
                # density 1 is AdamW whatever update_gap is.
                if k > 0 and ((group["reset_state"] and k < size) or "exp_avg" not in state):
                    self._zeros_moments(state, p, (rows, k) if proj == "columns" else (k, cols))
            if k > 0:
                state["adam_step"] += 1
                work.update(kinds=COLUMNS if proj == "columns" else ROWS, exp_avgs=state["exp_avg"],
                            exp_avg_sqs=state["exp_avg_sq"], indices=state["indices"],
                            steps=state["adam_step"])
        elif proj in ("svd", "random"):
            self._prepare_low_rank(p, grad, state, group, refresh, work)
        return work

    def _prepare_low_rank(self, p, grad, state, group, refresh, work) -> None:
        """svd/random: the subspace Adam runs here on the small projected tensors (matrix products
        through BLAS/cuBLAS); the fused op then applies it and the residual in one pass."""
        rows, cols = matrix_shape(p)
        right = rows >= cols  # project the smaller side
        r = subspace_size(group["density"], min(rows, cols))
        if r == 0:
            return  # state-free: signSGD on all of G
        G = grad.reshape(rows, cols)
        if refresh:
            if group["proj"] == "svd":
                basis = svd_basis(G, r, right)
            else:
                basis = random_basis(cols if right else rows, r, self._generator, _acc_dtype(p.dtype))
            state["projection"] = basis.to(device=p.device, dtype=p.dtype)
            if group["reset_state"] or "exp_avg" not in state:
                self._zeros_moments(state, p, (rows, r) if right else (r, cols))
        P = state["projection"]
        low = G @ P if right else P.T @ G
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["adam_step"] += 1
        t = state["adam_step"]
        m.lerp_(low, 1.0 - beta1)
        v.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        direction = (m / (1.0 - beta1 ** t)) / (v.sqrt() / math.sqrt(1.0 - beta2 ** t) + group["eps"])
        back = (lambda x: x @ P.T) if right else (lambda x: P @ x)
        # At full rank P·Pᵀ = I: the residual is zero, not the rounding noise of G − P·Pᵀ·G (whose
        # sign signSGD would follow).
        base = G if r == min(rows, cols) else back(low).reshape(p.shape)
        work.update(kinds=RESIDUAL, residual_bases=base.reshape(p.shape).contiguous(),
                    dense_updates=back(direction).reshape(p.shape).contiguous())
