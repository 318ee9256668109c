"""The rank function the adaptive DDP test spawns (no tests here: spawned processes import this
module by name, so it stays light and free of pytest fixtures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from gloo_group import gloo_process_group
from batchscope.adaptive import AdaptiveBatchSize, BatchSizePolicy, ExampleSchedule
from batchscope.analysis.throughput_model import fit_throughput_model
from batchscope.errors import UsageError

EPOCHS = 3
START_BATCH = 16  # global: 8 a rank
CANDIDATES = [4, 8, 16, 32, 64]  # per device
OVERHEAD_ONLY = (1.0, 1e-6)  # step seconds = a + b * per-device batch: bigger is always faster
AFFINE = (0.002, 1e-4)  # optimum per device sqrt(a B_noise / (W b)) = sqrt(10 B_noise)


def run_rank(rank: int, world: int, init_file: str, out_dir: str, helpers: str) -> None:
    sys.path.insert(0, helpers)
    from test_noise_problems import N_EXAMPLES, linear_data, linear_model

    with gloo_process_group(rank, world, init_file):
        result = {"whole": _train(linear_model(), linear_data(), N_EXAMPLES, max_fit=64),
                  # 32 a rank with 16 fitting: two micro-batches a step, the first under no_sync.
                  "accumulated": _train(linear_model(), linear_data(), N_EXAMPLES, max_fit=16,
                                        start=64),
                  # An affine step time, where the per-device plan (B_noise / W) matters.
                  "affine": _train(linear_model(), linear_data(), N_EXAMPLES, max_fit=64,
                                   step_time=AFFINE),
                  "unequal": _unequal_shares(linear_model(), linear_data(), rank)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _adaptive(ddp, max_fit: int, dataset_size: int, start: int = START_BATCH,
              step_time: tuple[float, float] = OVERHEAD_ONLY):
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    overhead, per_example = step_time
    step_time = fit_throughput_model(CANDIDATES, [overhead + per_example * m for m in CANDIDATES])
    policy = BatchSizePolicy(step_time, CANDIDATES, max_fit_batch_size=max_fit, reference_batch_size=16)
    adaptive = AdaptiveBatchSize(ddp, optimizer, policy, batch_size=start, base_batch_size=16,
                                 base_lr=0.01, schedule=ExampleSchedule(EPOCHS * dataset_size),
                                 measure_every=1, decide_every=4, min_samples=2)
    return adaptive, optimizer


def _unequal_shares(model, data, rank: int) -> str:
    """A loop with its own sampler handing the ranks 9 and 7 examples: every rank must refuse."""
    x, y = data
    ddp = DistributedDataParallel(model)
    adaptive, _ = _adaptive(ddp, 64, len(y))
    share = 9 if rank == 0 else 7
    try:
        next(adaptive.micro_batches((x[:share], y[:share])))
    except UsageError as error:
        return str(error)
    finally:
        adaptive.close()
    return "no error"


def _train(model, data, dataset_size: int, max_fit: int, start: int = START_BATCH,
           step_time: tuple[float, float] = OVERHEAD_ONLY) -> dict:
    x, y = data
    ddp = DistributedDataParallel(model)
    adaptive, optimizer = _adaptive(ddp, max_fit, dataset_size, start, step_time)
    sampler = adaptive.batch_sampler(dataset_size, seed=3)
    steps = []
    while not adaptive.finished:
        for indices in sampler:
            for micro, weight in adaptive.micro_batches((x[indices], y[indices])):
                loss = 0.5 * ((ddp(micro[0]).squeeze(-1) - micro[1]) ** 2).mean()
                (weight * loss).backward()
            adaptive.step()
            steps.append({"indices": indices, "lr": optimizer.param_groups[0]["lr"],
                          "sample": _last_sample(adaptive)})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    adaptive.close()
    return {"steps": steps, "changes": adaptive.changes, "history": adaptive.history, "max_fit": max_fit, "examples_seen": adaptive.examples_seen,
            "noise_scale": adaptive.noise_scale, "world_size": adaptive.world_size,
            "params": [p.detach().reshape(-1).tolist() for p in model.parameters()]}


def _last_sample(adaptive) -> list[int] | None:
    sample = adaptive.monitor.tracker.last
    return None if sample is None else [sample.b_small, sample.b_big]
