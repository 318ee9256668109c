"""`tune` called on every rank of a data-parallel job: one measurement, one answer, checked on
every device.

Ranks that each measured for themselves would come back with different timings, noise samples
and so different recommendations, and a job whose ranks disagree on the batch size hangs or
trains wrong. So:

1. every rank times an all-reduce of the model's gradient size (what DDP adds to each
   optimizer step), and the slowest rank's median is the plan's `sync_seconds`;
2. rank 0 runs the whole tune on its device, planning for the world size (the others wait);
3. its result (or its error) is broadcast, so every rank returns the same `TuneResult`;
4. every rank then runs real training steps at the recommended per-device micro-batch on its
   own device (the memory probe's check: forward, backward, optimizer step, twice) and the
   outcomes are gathered: a device that cannot hold it (less free memory, another job on it)
   fails the call on every rank alike, naming the rank.

Every rank must call `tune`; to measure on one process only (or off the cluster), pass
`world_size=` explicitly, which plans for that many devices without any collective.
The result crosses ranks with `broadcast_object_list` (pickle, between this job's own
processes; nothing is read back from disk).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from batchscope import device as devices
from batchscope.errors import ProbeFailedError
from batchscope.guard import StateGuard
from batchscope.probes.memory_runner import InProcessRunner, MemoryProbe, ProbePlan
from batchscope.workload import Workload

if TYPE_CHECKING:
    from batchscope.tuning import TuneResult

VERIFY_STEPS = 2  # the first step allocates the optimizer state; the second is the steady peak
SYNC_WARMUP, SYNC_TIMED = 2, 7  # all-reduces: the first ones set up buffers and connections


def tune_on_rank_zero(measure: Callable[[float], "TuneResult"], workload: Workload,
                      device: torch.device, budget_bytes: int | None,
                      say: Callable[[str], None]) -> "TuneResult":
    """Time the gradient all-reduce on every rank, run `measure(sync_seconds)` (the one-process
    tune) on rank 0, hand its result to every rank, and check the recommended per-device batch
    on every rank's device (module docstring)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    say("timing the gradient all-reduce across the ranks")
    sync = time_gradient_allreduce(workload, device)
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            outcome[0] = measure(sync.seconds)
        except BaseException as exc:
            # The other ranks are waiting in the broadcast: tell them, then fail here too.
            outcome[0] = _Failure(type(exc).__name__, str(exc))
            _broadcast(outcome, device)
            raise
    else:
        say(f"waiting for rank 0's measurements (rank {rank} of {world})")
    _broadcast(outcome, device)
    result = outcome[0]
    if isinstance(result, _Failure):
        raise ProbeFailedError(f"rank 0's tune failed, so rank {rank} has no recommendation: "
                               f"{result.kind}: {result.message}")

    per_device = result.recommendation.per_device_batch_size
    say(f"checking per-device batch {per_device} on every rank")
    probe = verify_batch(workload, device, per_device, budget_bytes)
    outcomes = _gather(probe, device, world)
    failed = [r for r, (fits, _) in enumerate(outcomes) if not fits]
    result.record.sections["ranks"] = {
        "world_size": world, "per_device_batch_size": per_device,
        "allreduce_bytes": sync.bytes, "allreduce_s": sync.seconds,
        "checked": [{"rank": r, "fits": fits, "peak_bytes": peak} for r, (fits, peak) in enumerate(outcomes)],
    }
    if rank == 0 and result.out_dir is not None:
        from batchscope.report.tune_report import write_tune_report

        result.record.save(result.out_dir / "run.json")
        write_tune_report(result.record, result.out_dir)  # with the ranks' table
    if failed:
        raise ProbeFailedError(
            f"per-device batch {per_device}, planned on rank 0, does not fit on rank(s) {failed}"
            + (f" (here: {probe.reason})" if rank in failed else "")
            + "; free memory there, or pass memory_budget= with the smallest rank's free memory "
              "so rank 0 plans within it")
    return result


@dataclass(frozen=True)
class SyncTime:
    """One all-reduce of the model's gradients: its size and the slowest rank's median time."""

    bytes: int
    seconds: float


def time_gradient_allreduce(workload: Workload, device: torch.device) -> SyncTime:
    """What DDP adds to every optimizer step: an all-reduce of every trainable parameter's
    gradient (one flat buffer here; DDP's buckets add a little latency, and it overlaps some of
    it with the backward pass). Every rank must call it; all get the same answer."""
    with StateGuard(rng=True):  # building a model draws from the RNG
        model = workload.build_model(device)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
        del model
    where = _collective_device(device)
    buffer = torch.zeros(numel, dtype=dtype, device=where)
    times = []
    for index in range(SYNC_WARMUP + SYNC_TIMED):
        devices.synchronize(where)
        started = time.perf_counter()
        dist.all_reduce(buffer)
        devices.synchronize(where)
        if index >= SYNC_WARMUP:
            times.append(time.perf_counter() - started)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=where)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    del buffer
    devices.release_memory(where)
    return SyncTime(bytes=numel * torch.empty((), dtype=dtype).element_size(), seconds=float(slowest))


def verify_batch(workload: Workload, device: torch.device, batch_size: int,
                 budget_bytes: int | None) -> MemoryProbe:
    """Real training steps at `batch_size` on this rank's device, judged as a memory probe is
    (an OOM, a missing step or a peak over the budget fails it); user state restored."""
    budget = budget_bytes if budget_bytes is not None else devices.total_memory_bytes(device)
    with StateGuard(rng=True) as guard:
        runner = InProcessRunner(workload, device, ProbePlan(budget_bytes=budget, steps=VERIFY_STEPS),
                                 guard, warm_batch_size=1)
        try:
            return runner.probe(batch_size)
        finally:
            runner.close()


@dataclass(frozen=True)
class _Failure:
    """Rank 0's error, as the other ranks receive it (its type's name and message: the
    exception itself may not survive pickling)."""

    kind: str
    message: str


def _collective_device(device: torch.device) -> torch.device:
    # NCCL moves only CUDA tensors; gloo (and the object broadcast's sizes) wants CPU ones.
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast(box: list[Any], device: torch.device) -> None:
    dist.broadcast_object_list(box, src=0, device=_collective_device(device))


def _gather(probe: MemoryProbe, device: torch.device, world: int) -> list[tuple[bool, int | None]]:
    """(fits, peak bytes or None) of every rank, in rank order."""
    where = _collective_device(device)
    mine = torch.tensor([int(probe.fits), -1 if probe.peak_bytes is None else probe.peak_bytes],
                        dtype=torch.int64, device=where)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return [(bool(t[0]), None if int(t[1]) < 0 else int(t[1])) for t in everyone]


__all__ = ["SyncTime", "time_gradient_allreduce", "tune_on_rank_zero", "verify_batch"]
