"""The rank function the DDP noise test spawns (no tests here: spawned processes import this
module by name, so it stays light and free of pytest fixtures)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gloo_group import gloo_process_group
from batchscope.probes.noise_ddp import DistributedGradientNoiseMonitor, all_reduce_gradients_with_noise
from batchscope.probes.noise_online import NoiseTracker

STEPS = 100
CONFIDENCE = 0.99  # single-run interval checks: a miss should mean a bug, not bad luck
MICRO = 4


def trained_mlp(workload, steps: int = 10, lr: float = 0.05):
    """The MLP after a few plain SGD steps (manual updates: same result in every process)."""
    model = workload.build_model(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        workload.loss(model, workload.make_batch(16, torch.device("cpu"), generator)).backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= lr * param.grad
    model.zero_grad(set_to_none=True)
    return model


def run_rank(rank: int, world: int, init_file: str, out_dir: str, helpers: str) -> None:
    sys.path.insert(0, helpers)
    from test_noise_problems import linear_model, linear_workload, mlp_workload

    with gloo_process_group(rank, world, init_file):
        results = {
            "linear_ddp": _ddp_monitor(linear_model(), linear_workload(), rank),
            "linear_explicit": _explicit(linear_model(), linear_workload(), rank),
            "mlp_ddp": _ddp_monitor(trained_mlp(mlp_workload()), mlp_workload(), rank),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _ddp_monitor(model, workload, rank: int) -> dict:
    """DDP with two micro-batches per step (the first under no_sync): small batch 4 per rank and
    micro-batch, big batch world * 2 * 4. The first steps are also computed by hand (every
    micro-batch gradient gathered from every rank) to check the monitor's numbers exactly."""
    ddp = DistributedDataParallel(model)
    reference = copy.deepcopy(model)
    monitor = DistributedGradientNoiseMonitor(ddp, MICRO, every=1, window=None)
    generator = torch.Generator().manual_seed(10 * (rank + 1))
    cpu = torch.device("cpu")
    mismatches = []
    for step in range(STEPS):
        ddp.zero_grad(set_to_none=True)
        batches = [workload.make_batch(MICRO, cpu, generator) for _ in range(2)]
        with ddp.no_sync():
            workload.loss(ddp, batches[0]).backward()
        workload.loss(ddp, batches[1]).backward()
        sample = monitor.step()
        if step < 3:
            small, big = _by_hand(reference, workload, batches)
            if abs(sample.sq_norm_small - small) > 1e-5 * small or abs(sample.sq_norm_big - big) > 1e-5 * big:
                mismatches.append((step, sample.sq_norm_small, small, sample.sq_norm_big, big))
    monitor.close()
    return {"estimate": monitor.estimate(CONFIDENCE).to_dict(), "b_small": sample.b_small,
            "b_big": sample.b_big, "mismatches": mismatches}


def _by_hand(model, workload, batches) -> tuple[float, float]:
    """Mean squared norm of all ranks' micro-batch gradients, and squared norm of their mean."""
    local = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        workload.loss(model, batch).backward()
        local.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    local = torch.stack(local)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    every = torch.cat(gathered).double()
    return float(every.square().sum(1).mean()), float(every.mean(0).square().sum())


def _explicit(model, workload, rank: int) -> dict:
    """A loop that averages gradients itself: one batch of 8 per rank per step."""
    tracker = NoiseTracker(window=None)
    generator = torch.Generator().manual_seed(20 * (rank + 1))
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        workload.loss(model, workload.make_batch(2 * MICRO, torch.device("cpu"), generator)).backward()
        local = [p.grad.clone() for p in model.parameters()]
        sample = all_reduce_gradients_with_noise(model, 2 * MICRO)
        tracker.add(sample)
    gathered = [torch.zeros_like(local[0]) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local[0])
    averaged = torch.stack(gathered).mean(0)
    return {
        "estimate": tracker.estimate(CONFIDENCE).to_dict(),
        "b_small": sample.b_small,
        "b_big": sample.b_big,
        "grad_is_rank_mean": bool(torch.allclose(model.weight.grad, averaged, rtol=1e-5, atol=1e-7)),
    }
