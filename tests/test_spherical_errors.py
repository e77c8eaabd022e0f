"""fusedtrain.spherical_loss and its compiled ops given bad input: every error names the argument,
in the public API, the module and the raw `torch.ops.fusedtrain` ops (forward and backward).
"""
from __future__ import annotations

import pytest
import torch

import fusedtrain

from spherical_helpers import make_case
from utils import HAS_CUDA


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randn(4, 5, device=d), torch.zeros(4, dtype=torch.bool, device=d)), "target"),
        (lambda d: (torch.randn(4, 5, device=d), torch.zeros(4, device=d)), "target"),
        (lambda d: (torch.zeros(4, 5, dtype=torch.int64, device=d), torch.zeros(4, dtype=torch.long, device=d)), "logits"),
        (lambda d: (torch.randn(4, 5, device=d), torch.zeros(3, dtype=torch.long, device=d)), "target"),
        (lambda d: (torch.randn(4, 5, 2, device=d), torch.zeros(4, dtype=torch.long, device=d)), "target"),
        (lambda d: (torch.randn(5, device=d), torch.zeros(5, dtype=torch.long, device=d)), "logits"),
        (lambda d: (torch.randn(4, 0, device=d), torch.zeros(4, dtype=torch.long, device=d)), "logits"),
    ],
    ids=["target-bool", "target-float", "logits-int64", "target-shape", "target-shape-3d", "logits-1d",
         "zero-classes"],
)
def test_bad_tensors_raise_naming_the_argument(device, make, match):
    logits, target = make(device)
    with pytest.raises((TypeError, ValueError), match=match):
        fusedtrain.spherical_loss(logits, target)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kind": "softmax"}, "kind"), ({"kind": "z_loss"}, "kind"), ({"reduction": "avg"}, "reduction"),
     ({"reduction": None}, "reduction"), ({"a": 0.0}, "a must"), ({"a": -1.0}, "a must"),
     ({"a": float("nan")}, "a must"), ({"b": float("inf")}, "b must"), ({"b": float("nan")}, "b must"),
     ({"kind": "spherical", "eps": 0.0}, "eps"), ({"kind": "spherical", "eps": -1e-6}, "eps"),
     ({"kind": "spherical", "eps": float("nan")}, "eps"), ({"var_eps": -1.0}, "var_eps"),
     ({"var_eps": float("nan")}, "var_eps"), ({"ignore_index": 1.5}, "ignore_index")],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_hyperparameters_raise(device, kwargs, match):
    # "z_loss" is deliberately not a kind: elsewhere it names the unrelated logsumexp² penalty.
    logits, target = make_case(4, 5, device)
    with pytest.raises((TypeError, ValueError), match=match):
        fusedtrain.spherical_loss(logits, target, **kwargs)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        fusedtrain.nn.SphericalLoss("softmax")
    with pytest.raises(ValueError, match="reduction"):
        fusedtrain.nn.SphericalLoss("z", reduction="avg")


_OP_DEFAULTS = dict(kind="z", a=0.05, b=20.0, eps=1e-6, var_eps=1e-6, ignore_index=-100,
                    reduction="mean", compute_grad=False, check_target=True)


@pytest.mark.parametrize(
    "change, match",
    [({"logits": lambda d: torch.randn(4, 0, device=d)}, "logits"),
     ({"logits": lambda d: torch.randn(4, device=d)}, "logits"),
     ({"logits": lambda d: torch.randn(4, 5, 2, device=d)}, "logits"),
     ({"logits": lambda d: torch.zeros(4, 5, dtype=torch.long, device=d)}, "logits"),
     ({"target": lambda d: torch.zeros(3, dtype=torch.long, device=d)}, "target"),
     ({"target": lambda d: torch.zeros(4, dtype=torch.int32, device=d)}, "target"),
     ({"target": lambda d: torch.tensor([0, 1, 5, 2], device=d)}, "target"),
     ({"target": lambda d: torch.tensor([0, -3, 1, 2], device=d)}, "target"),
     ({"kind": "bad"}, "kind"), ({"reduction": "avg"}, "reduction"), ({"a": -1.0}, "a must"),
     ({"b": float("nan")}, "b must"), ({"kind": "spherical", "eps": 0.0}, "eps"),
     ({"var_eps": -1.0}, "var_eps")],
    ids=lambda v: "-".join(f"{k}" for k in v) if isinstance(v, dict) else None,
)
def test_compiled_op_checks_arguments_too(device, needs_kernels, change, match):
    # The C++ op is public (torch.ops.fusedtrain.spherical_loss): it checks on its own.
    args = dict(logits=torch.randn(4, 5, device=device), target=torch.randint(0, 5, (4,), device=device),
                **_OP_DEFAULTS)
    args.update({k: (v(device) if callable(v) else v) for k, v in change.items()})
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        torch.ops.fusedtrain.spherical_loss(*args.values())


def test_compiled_backward_checks_arguments(device, needs_kernels):
    logits, target = make_case(4, 5, device)
    coef = torch.randn(4, 4, device=device)
    bw = torch.ops.fusedtrain._spherical_loss_backward
    with pytest.raises((ValueError, RuntimeError), match="coef"):
        bw(torch.rand(4, device=device), logits, target, coef[:3], -100)
    with pytest.raises((ValueError, RuntimeError), match="grad_loss"):
        bw(torch.rand(3, device=device), logits, target, coef, -100)
    with pytest.raises((ValueError, RuntimeError), match="grad_loss"):
        torch.ops.fusedtrain._scale_grad_(torch.randn(4, 5, device=device), torch.rand(3, device=device))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_target_on_other_device_raises():
    with pytest.raises(ValueError, match="target"):
        fusedtrain.spherical_loss(torch.randn(4, 5, device="cuda"), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        fusedtrain.spherical_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long, device="cuda"))
