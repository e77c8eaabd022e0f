"""`FRUGALBase`: the FRUGAL optimizer's bookkeeping (options, subspaces, state, `state_dict`), shared
by `FRUGAL` (fused step) and `FRUGALReference` (reference step), which differ only in `_step_fn`."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .._core.dtypes import accumulate_dtype
from .._core.autocast import suspended
from .distributed import export_sharded_state, is_sharded, prepare_shard, shared_seed
from .options import FLAGS, check_group, check_options
from .state import check_state_dict
from .subspace import (COLUMNS, DENSE, FREE, RESIDUAL, ROWS,
                       block_selection, matrix_shape, random_basis, select_indices, subspace_size, svd_basis)

__all__ = ["FRUGALBase", "check_group", "check_options"]


class FRUGALBase(torch.optim.Optimizer):
    """FRUGAL's optimizer logic, everything but the element-wise update: per param group the options
    (checked by `check_group`), the subspace of each tensor and its refreshes, the moments, the
    `state_dict` (with the subspace generator), and the bucketing of each step into one `_step_fn`
    call per (device, dtype). Subclasses set `_step_fn` (the fused op, or the reference)."""

    _step_fn = None

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, density: float = 0.25, proj: str | None = "columns",
                 update_gap: int = 200, reset_state: bool = True, free_update: str = "signsgd",
                 free_lr_scale: float = 1.0, seed: int | None = None, block_order: str = "random", *,
                 amsgrad: bool = False, maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 **unexpected):
        if unexpected:  # else Python's TypeError would name this internal class
            raise TypeError(f"FRUGAL got unexpected keyword arguments {sorted(unexpected)}")
        # torch.optim.AdamW's flags that FRUGAL cannot honour: refused, not silently ignored.
        for flag, value, why in (
                ("amsgrad", amsgrad, "its subspace moments are Adam's, without AMSGrad's running maximum"),
                ("capturable", capturable, "the step counters and subspace bookkeeping live on the host, "
                                           "so the step cannot be captured in a CUDA graph"),
                ("differentiable", differentiable, "the fused step updates in place outside autograd")):
            if value:
                raise ValueError(f"FRUGAL does not support {flag}=True: {why}")
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, density=density, proj=proj, update_gap=update_gap,
                        reset_state=reset_state, free_update=free_update, free_lr_scale=free_lr_scale,
                        block_order=block_order, maximize=maximize, foreach=foreach, fused=fused)
        if seed is None:  # drawn from torch's global generator: torch.manual_seed makes runs repeatable
            seed = shared_seed()  # under a process group: rank 0's draw, broadcast (a collective)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
        # One CPU generator draws every subspace (any device), so CPU and CUDA runs choose alike.
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for flag, default in FLAGS.items():
            group.setdefault(flag, default)
        check_group(group, len(self.param_groups) - 1)
        # Steps this group has taken: the "block" projection refreshes on it. In the group dict so
        # that state_dict() carries it.
        group.setdefault("block_step", 0)

    # -----------------------------------------------------------------------------------------
    # state_dict: torch's (per-param state, param groups) plus the subspace generator

    def state_dict(self) -> dict:
        state = super().state_dict()
        # The generator rides in every param group, as bytes: torch.distributed.checkpoint's
        # get/set_optimizer_state_dict keep only "state" and "param_groups", and a CPU tensor there
        # would clash with the moments' device.
        generator = self._generator.get_state().numpy().tobytes()
        for group in state["param_groups"]:
            group["frugal_generator"] = generator
        return export_sharded_state(self, state)  # sharded params' rows moments (a collective)

    def load_state_dict(self, state_dict: dict) -> None:
        # Checked before anything is loaded: a bad state dict leaves the optimizer as it was.
        check_state_dict(state_dict, self.param_groups)
        state_dict = dict(state_dict)
        generator = state_dict.pop("frugal_generator", None)  # where older state dicts kept it
        groups = [dict(group) for group in state_dict["param_groups"]]
        for group in groups:
            generator = group.pop("frugal_generator", generator)
        state_dict["param_groups"] = groups
        if isinstance(generator, bytes):
            generator = torch.frombuffer(bytearray(generator), dtype=torch.uint8)
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
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Checked before any bookkeeping moves: step counts, subspaces and the fused step's
            # hyperparameters are host values, so a captured graph would replay one step forever.
            raise RuntimeError("FRUGAL.step cannot be captured in a CUDA graph: its step counters, subspaces "
                               "and hyperparameters live on the host (capturable=True is refused for the same "
                               "reason); call step() outside torch.cuda.graph")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Autocast off: a step called inside an autocast region would otherwise run the svd/random
        # projections' matrix products in bf16 (torch's optimizers use no autocast-listed op).
        with suspended("cpu"), suspended("cuda"):
            for group_id, group in enumerate(self.param_groups):
                check_options(group, group_id)  # a group dict may have been edited since the last step
                self._step_group(group)
        return loss

    def _select_step(self, group: dict):
        """The step function for this group (FRUGAL picks by its `foreach`/`fused` flags)."""
        return self._step_fn

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return

        for p in params:
            if p.grad.layout != torch.strided:  # COO, CSR, CSC, BSR, BSC
                raise RuntimeError(f"FRUGAL does not support sparse gradients (a {p.grad.layout} gradient of a "
                                   f"param of shape {tuple(p.shape)}); use dense gradients (e.g. "
                                   "nn.Embedding(sparse=False))")
        if group["proj"] == "block" and group["block_step"] % group["update_gap"] == 0:
            self._refresh_blocks(group)
        group["block_step"] += 1
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), free_update=group["free_update"],
                     free_lr_scale=float(group["free_lr_scale"]))
        step_fn = self._select_step(group)
        buckets = defaultdict(lambda: defaultdict(list))
        for p in params:
            work = self._prepare(p, group)
            if work["kinds"] == RESIDUAL:
                # Applied at once: its two param-size temporaries are freed before the next
                # tensor's are made (peak memory of one tensor's, not the whole group's).
                self._apply({key: [value] for key, value in work.items()}, step_fn, **hyper)
                continue
            bucket = buckets[(p.device, p.dtype)]
            for key, value in work.items():
                bucket[key].append(value)
        for bucket in buckets.values():  # one fused call per (device, dtype)
            self._apply(bucket, step_fn, **hyper)

    def _apply(self, bucket: dict, step_fn=None, **hyper) -> None:
        params = bucket["params"]
        # The fused op wants contiguous params; a non-contiguous one is updated through a copy.
        targets = [p if p.is_contiguous() else p.contiguous() for p in params]
        (step_fn or self._step_fn)(targets, bucket["grads"], bucket["exp_avgs"], bucket["exp_avg_sqs"],
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

    def _begin_step(self, state: dict, group: dict, param: torch.Tensor, grad: torch.Tensor) -> tuple[bool, dict]:
        """Counts the step of `param` (the tensor the fused op updates: a parameter, or this rank's
        shard of one) and returns (whether its subspace is redrawn now, its work entry before any
        projection: the gradient, negated under maximize, and no moments)."""
        if "step" not in state:
            state["step"] = 0
        refresh = state["step"] % group["update_gap"] == 0
        state["step"] += 1
        grad = grad if grad.is_contiguous() else grad.contiguous()
        if group.get("maximize", False):  # FRUGAL on −g, moments included (torch's maximize)
            grad = -grad
        empty, no_indices = self._empties(param)
        return refresh, dict(params=param, grads=grad, exp_avgs=empty, exp_avg_sqs=empty, indices=no_indices,
                             residual_bases=empty, dense_updates=empty, kinds=FREE, steps=0)

    def _prepare(self, p: torch.Tensor, group: dict) -> dict:
        """This step's work for param p (an entry of each of the fused op's lists)."""
        if is_sharded(p):  # a DTensor (FSDP2): the step runs on this rank's shard
            return prepare_shard(self, p, group)
        state = self.state[p]
        refresh, work = self._begin_step(state, group, p, p.grad)
        grad = work["grads"]
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
                basis = random_basis(cols if right else rows, r, self._generator, accumulate_dtype(p.dtype))
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
