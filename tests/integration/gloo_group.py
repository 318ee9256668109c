"""A CPU process group for the tests that spawn real data-parallel ranks (no tests here)."""

from __future__ import annotations

import gc
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextmanager
def gloo_process_group(rank: int, world: int, init_file: str) -> Iterator[None]:
    """This rank in a gloo group on the loopback interface (no network needed), torn down safely."""
    torch.set_num_threads(1)
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        # Without this collection about one run in four aborted at interpreter exit, after the
        # results were written ("terminate called without an active exception", torch 2.13 +
        # gloo; 0 of 16 with it): the DDP wrappers sit in reference cycles and were otherwise
        # torn down at shutdown, after the process group. The barrier lets every rank finish
        # before any tears the group down.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(run_rank: Callable[..., None], world: int, directory: Path, *args: Any) -> list[dict]:
    """Run `run_rank(rank, world, init_file, directory, *args)` in `world` spawned processes and
    read back what each wrote to `directory/rank<N>.json`."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(run_rank, args=(world, str(directory / "init"), str(directory), *args), nprocs=world, join=True)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(world)]
