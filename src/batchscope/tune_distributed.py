"""`tune` called on every rank of a data-parallel job: one measurement, one answer, checked on
every device, and every failure shared so that no rank is left waiting.

Ranks that each measured for themselves would come back with different timings, noise samples
and so different recommendations, and a job whose ranks disagree on the batch size hangs or
trains wrong. So:

1. every rank prepares (workload, device, budget) and builds the model once, to time an
   all-reduce of its gradients on the job's own backend (what DDP adds to each optimizer step);
   the slowest rank's median is the plan's `sync_seconds`;
2. rank 0 runs the whole tune on its device, planning for the world size (the others wait);
3. its result is broadcast, so every rank returns the same `TuneResult`;
4. every rank runs real training steps at the recommended per-device micro-batch on its own
   device (the memory probe's check: forward, backward, optimizer step, twice); a device that
   cannot hold it (less free memory, another job on it) fails the call on every rank alike,
   naming the rank and why.

Each stage ends with every rank telling the others whether it failed (`all_or_none`): a rank
that fails raises its own error, the others a `ProbeFailedError` naming it, instead of waiting
in the next collective until the process group times out. The waiting and the messages go over
a gloo group of their own whose timeout covers rank 0's whole tune (NCCL's default of 10 minutes
would not cover a long budget).

Every rank must call `tune`; to measure on one process only (or off the cluster), pass
`world_size=` explicitly, which plans for that many devices without any collective. Results
cross ranks with torch.distributed's object collectives (pickle, between this job's own
processes; nothing is read back from disk).
"""

from __future__ import annotations

import contextlib
import math
import pickle
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, TypeVar

import torch
import torch.distributed as dist

from batchscope import device as devices
from batchscope.errors import ProbeFailedError, UsageError
from batchscope.guard import StateGuard
from batchscope.probes.memory_runner import InProcessRunner, MemoryProbe, ProbePlan
from batchscope.workload import Workload

if TYPE_CHECKING:
    from batchscope.tuning import TuneResult

VERIFY_STEPS = 2  # the first step allocates the optimizer state; the second is the steady peak
SYNC_WARMUP, SYNC_TIMED = 2, 7  # all-reduces: the first ones set up buffers and connections
# The coordination group waits out rank 0's tune: this much beyond the budget, and never less
# than torch's own default for gloo.
WAIT_SLACK_S, MIN_WAIT_S, MAX_WAIT_S = 600.0, 1800.0, 7 * 24 * 3600.0

class Prepared(Protocol):
    """What each rank prepares before anything is measured (tuning's own preparation)."""

    workload: Workload
    device: torch.device
    budget_bytes: int | None


P = TypeVar("P", bound=Prepared)


@dataclass(frozen=True)
class SyncTime:
    """One all-reduce of the model's gradients: its size and the slowest rank's median time
    (0 when it could not be timed on this backend, with the reason)."""

    bytes: int
    seconds: float
    note: str = ""


def tune_on_every_rank(prepare: Callable[[], P], measure: Callable[[P, float], "TuneResult"], *,
                       budget_s: float, say: Callable[[str], None]) -> "TuneResult":
    """The module docstring's stages; every rank returns rank 0's result or raises. Everything
    a rank does on its own (progress messages included) sits inside an agreement point, so the
    collectives between them are entered by every rank or by none."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # Said before the group is made, which waits for every rank: a rank left waiting there
    # (the others never called tune) has at least said what it waits for. A progress callback
    # that fails here fails inside the first agreement point, not before the group.
    try:
        say(f"rank {rank} of {world}: waiting for every rank to call tune(distributed=True)")
        failed_to_say: Exception | None = None
    except Exception as exc:  # noqa: BLE001 - re-raised below, where every rank agrees
        failed_to_say = exc
    group = _coordination_group(budget_s)
    try:
        with all_or_none("preparing tune", group):
            if failed_to_say is not None:
                raise failed_to_say
            say(f"rank {rank} of {world}: preparing")
            prepared = prepare()
            workload, device = prepared.workload, prepared.device
            buffer = _gradient_buffer(workload, device)
            say("timing the gradient all-reduce across the ranks")
        sync = time_allreduce(buffer, device)
        del buffer
        devices.release_memory(device)

        with all_or_none("rank 0's measurement", group):
            if rank == 0:
                result = measure(prepared, sync.seconds)
                pickle.dumps(result)  # what the broadcast sends: fail here, where all agree
            else:
                result = None
                say(f"waiting for rank 0's measurements (rank {rank} of {world})")
        box = [result]
        dist.broadcast_object_list(box, src=0, group=group)
        result = box[0]

        with all_or_none("checking the per-device batch", group):
            per_device = result.recommendation.per_device_batch_size
            say(f"checking per-device batch {per_device} on every rank")
            probe = verify_batch(workload, device, per_device, prepared.budget_bytes)
        checks: list[Any] = [None] * world
        dist.all_gather_object(checks, {"fits": probe.fits, "peak_bytes": probe.peak_bytes,
                                        "reason": probe.reason}, group=group)

        with all_or_none("writing the run record", group):
            result.record.sections["ranks"] = {
                "world_size": world, "per_device_batch_size": per_device,
                "allreduce_bytes": sync.bytes, "allreduce_s": sync.seconds,
                "allreduce_note": sync.note,
                "checked": [{"rank": r, **check} for r, check in enumerate(checks)],
            }
            if rank == 0 and result.out_dir is not None:
                from batchscope.report.tune_report import write_tune_report

                result.record.save(result.out_dir / "run.json")
                write_tune_report(result.record, result.out_dir)  # with the ranks' table
        failed = [f"rank {r} ({check['reason']})" for r, check in enumerate(checks) if not check["fits"]]
        if failed:
            raise ProbeFailedError(
                f"per-device batch {per_device}, planned on rank 0, does not fit on "
                f"{', '.join(failed)}; free memory there, or pass memory_budget= with the smallest "
                f"rank's free memory so rank 0 plans within it")
        return result
    finally:
        if group is not None:
            dist.destroy_process_group(group)


@contextlib.contextmanager
def all_or_none(stage: str, group: Any) -> Iterator[None]:
    """Run the block on every rank, then agree: if it failed anywhere, it fails everywhere. The
    failing rank re-raises its own error (a UsageError stays one); the others raise a
    ProbeFailedError naming the rank(s) and the error."""
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - shared below, then raised again
        error = exc
    texts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(texts, None if error is None else _describe(error), group=group)
    if error is not None:
        raise error
    failed = [f"rank {r}: {text}" for r, text in enumerate(texts) if text is not None]
    if failed:
        raise ProbeFailedError(f"{stage} failed on {'; '.join(failed)}; rank "
                               f"{dist.get_rank()} stops with it")


def join_torchrun_job(device: str | None) -> torch.device:
    """Join the job torchrun started (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) on this
    process's device, with that device's backend; the device is returned."""
    import os

    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise UsageError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} "
                         "missing); launch with: torchrun --nproc-per-node N -m batchscope tune "
                         "... --distributed")
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1 and device is not None and ":" in str(device):
        raise UsageError(f"--device {device} under torchrun puts all {local_world} ranks of this host on "
                         f"one device; pass --device {str(device).split(':')[0]} (rank i takes the one "
                         "numbered LOCAL_RANK) or choose GPUs with CUDA_VISIBLE_DEVICES")
    where = devices.local_device(device, local_rank)
    if local_world > 1 and where.type == "mps":
        raise UsageError("MPS is one device per machine: run tune without --distributed (or with "
                         "world_size=) on a Mac")
    if not dist.is_initialized():
        dist.init_process_group(devices.distributed_backend(where))
    return where


def _describe(error: Exception) -> str:
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:  # noqa: BLE001 - an error whose message fails must still be shared
        return type(error).__name__


def time_allreduce(buffer: torch.Tensor, device: torch.device) -> SyncTime:
    """Time all-reduces of `buffer` (the gradients' size) on the job's default group, on the
    job's own backend for `device` (NCCL for CUDA, gloo for CPU...). Every rank must call it;
    nothing but collectives and device synchronisation happens in it. An empty buffer means
    the backend cannot reduce this device's tensors: not timed."""
    size = buffer.numel() * buffer.element_size()
    if buffer.numel() == 0:
        return SyncTime(0, 0.0, "not timed: the job's NCCL group cannot all-reduce CPU tensors")
    times = []
    for index in range(SYNC_WARMUP + SYNC_TIMED):
        devices.synchronize(device)
        started = time.perf_counter()
        dist.all_reduce(buffer)
        devices.synchronize(device)
        if index >= SYNC_WARMUP:
            times.append(time.perf_counter() - started)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return SyncTime(bytes=size, seconds=float(slowest))


def verify_batch(workload: Workload, device: torch.device, batch_size: int,
                 budget_bytes: int | None) -> MemoryProbe:
    """Real training steps at `batch_size` on this rank's device, judged as a memory probe is
    (an OOM, a missing step or a peak over the budget fails it); user state restored. Any error
    (the model alone does not fit, the workload fails here) is a failed check, not a raise: the
    other ranks are about to wait for this one's answer."""
    started = time.perf_counter()
    try:
        budget = budget_bytes if budget_bytes is not None else devices.total_memory_bytes(device)
        with StateGuard(rng=True) as guard:
            runner = InProcessRunner(workload, device, ProbePlan(budget_bytes=budget, steps=VERIFY_STEPS),
                                     guard, warm_batch_size=1)
            try:
                return runner.probe(batch_size)
            finally:
                runner.close()
    except Exception as exc:  # noqa: BLE001 - reported to every rank as this rank's failure
        return MemoryProbe(batch_size, False, None, time.perf_counter() - started, 0,
                           f"{type(exc).__name__}: {exc}")


def _gradient_buffer(workload: Workload, device: torch.device) -> torch.Tensor:
    """A zeroed buffer the size of the model's trainable gradients, in their dtype (DDP reduces
    gradients in the parameters' dtype, also under autocast), on `device`; empty when the job's
    backend cannot reduce this device's tensors."""
    with StateGuard(rng=True):  # building a model draws from the RNG
        model = workload.build_model(device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in trainable)
        dtype = trainable[0].dtype if trainable else torch.float32
        del model, trainable
    devices.release_memory(device)
    if device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.zeros(0, dtype=dtype)
    buffer = torch.zeros(numel, dtype=dtype, device=device)
    devices.synchronize(device)  # an allocation failure surfaces here, inside the agreement
    return buffer


def _coordination_group(budget_s: float) -> Any:
    """A gloo group for the waiting and the messages, with a timeout past rank 0's tune (None:
    no gloo in this build, the default group is used and its timeout applies)."""
    if not dist.is_gloo_available():
        return None
    wait = 3 * float(budget_s) + WAIT_SLACK_S if math.isfinite(float(budget_s)) else MAX_WAIT_S
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=min(MAX_WAIT_S, max(MIN_WAIT_S, wait))))


__all__ = ["Prepared", "SyncTime", "all_or_none", "join_torchrun_job", "time_allreduce",
           "tune_on_every_rank", "verify_batch"]
