"""Multi-process tests on the CPU: run a function on P gloo ranks and collect each rank's result.

The function must live at module level of an importable module (a test module is: spawned children
get the parent's sys.path), take `(rank, world_size, *args)` and return something `torch.save` can
write (tensors are returned as they are, so compare them in the parent). A rank that raises fails
the test with its traceback; a collective that never completes fails after `timeout_s`.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, timeout_s, fn, args, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # P ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 120.0) -> list:
    """`[fn(rank, world_size, *args) for each rank]`, each run in its own process of a gloo group."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), timeout_s, fn, args, out_dir),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
                for r in range(world_size)]
