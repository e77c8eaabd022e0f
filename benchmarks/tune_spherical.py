"""Launch-shape sweep of the CUDA spherical kernel at the acceptance shapes (one process per shape,
since FUSEDTRAIN_SPHERICAL_TUNE is read once per process). Prints fwd+bwd median ms and the
fraction of the measured copy bandwidth for the bytes that must move (read logits, write grad)."""
from __future__ import annotations

import os
import subprocess
import sys

CONFIGS = ["default", "256,0", "512,0", "1024,0", "512,96", "1024,96", "1024,200", "512,200"]
SHAPES = [(8192, 131072, "bfloat16"), (8192, 32768, "bfloat16"), (4096, 131072, "float32")]

CHILD = r"""
import sys, torch, fusedtrain
n, d, dt = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
x = torch.randn(n, d, device="cuda", dtype=dt).requires_grad_()
t = torch.randint(0, d, (n,), device="cuda")
def step():
    x.grad = None
    fusedtrain.spherical_loss(x, t, check_target=False).backward()
src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
def timed(fn, reps=20):
    for _ in range(3): fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[reps // 2]
copy_ms = timed(lambda: dst.copy_(src))
copy_bw = 2 * src.numel() / copy_ms / 1e6
ms = timed(step)
moved = 2 * x.numel() * x.element_size()
print(f"{ms:.3f} ms  {moved / ms / 1e6:.0f} GB/s  {moved / ms / 1e6 / copy_bw:.1%} of copy {copy_bw:.0f} GB/s")
"""


def main() -> None:
    for n, d, dt in SHAPES:
        for config in CONFIGS:
            env = dict(os.environ)
            if config != "default":
                env["FUSEDTRAIN_SPHERICAL_TUNE"] = config
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(d), dt], env=env,
                                 capture_output=True, text=True)
            line = out.stdout.strip() or out.stderr.strip().splitlines()[-1]
            print(f"{n}x{d} {dt:9s} {config:9s} {line}", flush=True)


if __name__ == "__main__":
    main()
