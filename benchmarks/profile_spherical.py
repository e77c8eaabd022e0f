"""Time breakdown of the CUDA spherical kernel at one shape (default: the acceptance shape,
8192 x 131072 bf16): forward without gradient (reads the logits once), forward that also writes the
gradient (the fused path of mean/sum), backward from the coefficients (the reduction="none" path),
the whole fwd+bwd step, and a device copy of the same bytes. Run under `ncu` with
`--kernel-name regex:spherical_rows --launch-skip 6 --launch-count 1` to profile one fused launch."""
from __future__ import annotations

import sys

import torch

import fusedtrain  # noqa: F401  (registers the ops)


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)[reps // 2]


def main() -> None:
    n, d = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (8192, 131072)
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
    x = torch.randn(n, d, device="cuda", dtype=dtype)
    t = torch.randint(0, d, (n,), device="cuda")
    op = torch.ops.fusedtrain.spherical_loss
    args = ("z", 0.05, 20.0, 1e-6, 1e-6, -100)
    nbytes = x.numel() * x.element_size()
    _, _, coef = op(x, t, *args, "none", False, False)
    up = torch.rand(n, device="cuda")
    xg = x.clone().requires_grad_()

    def step():
        xg.grad = None
        fusedtrain.spherical_loss(xg, t, check_target=False).backward()

    rows = [
        ("forward, no grad (read)", lambda: op(x, t, *args, "mean", False, False), nbytes),
        ("forward + grad (read, write)", lambda: op(x, t, *args, "mean", True, False), 2 * nbytes),
        ("backward from coef (read, write)",
         lambda: torch.ops.fusedtrain._spherical_loss_backward(up, x, t, coef, -100), 2 * nbytes),
        ("fwd+bwd step, mean", step, 2 * nbytes),
        ("copy_ of the logits (read, write)", lambda: xg.detach().copy_(x), 2 * nbytes),
    ]
    for name, fn, moved in rows:
        ms = timed(fn)
        print(f"{name:36s} {ms:8.3f} ms {moved / ms / 1e6:8.0f} GB/s")


if __name__ == "__main__":
    main()
