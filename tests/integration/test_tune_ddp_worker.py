"""The rank function the distributed tune test spawns (no tests here: spawned processes import
this module by name, so it stays light and free of pytest fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import batchscope
from gloo_group import gloo_process_group
from batchscope import tuning
from batchscope.tune_noise import NoisePlan
from batchscope.workload import resolve_workload

OPTIONS = {"train_size": 2048, "test_size": 256}


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # As test_tune pins it: 2 training steps and 16 noise samples, whatever the machine's speed.
    tuning.plan_noise_probe = lambda *args, **kwargs: NoisePlan(2, 2, 16)
    out = Path(out_dir)
    with gloo_process_group(rank, world, init_file):
        report = {"agreed": _tune(rank, out / f"agreed{rank}", "256MiB"),
                  # Rank 1's device is "smaller": the per-device batch rank 0 finds cannot fit it.
                  "smaller": _tune(rank, out / f"smaller{rank}", "256MiB" if rank == 0 else "2MiB"),
                  "broken": _tune(rank, None, "256MiB", workload=_broken_workload()),
                  # Rank 1 fails before any measurement (a bad argument of its own).
                  "unprepared": _tune(rank, None, "256MiB" if rank == 0 else "lots"),
                  # Rank 1's model no longer fits when its check builds it (an OOM, not a raise).
                  "full_device": _tune(rank, None, "256MiB", workload=_full_on_second_build(rank))}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _tune(rank: int, out: Path | None, memory_budget: str, workload=None) -> dict:
    if workload is None:
        workload = resolve_workload("small-cnn-cifar10", **OPTIONS)
    rng = torch.get_rng_state()
    try:
        result = batchscope.tune(workload, device="cpu", budget_s=10, memory_budget=memory_budget,
                                 distributed=True,
                                 out_dir=out)
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        return {"error": f"{type(exc).__name__}: {exc}", "rng_kept": torch.equal(rng, torch.get_rng_state())}
    rng_kept = torch.equal(rng, torch.get_rng_state())
    params = sum(p.numel() for p in workload.build_model(torch.device("cpu")).parameters())
    return {"recommendation": result.recommendation.to_dict(),
            "plan_sync_seconds": result.plan.sync_seconds, "gradient_bytes": 4 * params,
            "ranks": result.record.sections["ranks"],
            "seconds": result.seconds,
            "written": sorted(p.name for p in out.iterdir()) if out is not None and out.exists() else [],
            "rng_kept": rng_kept,
            "report_has_ranks": out is not None and (out / "report.html").exists()
            and "checked on every rank" in (out / "report.html").read_text()}


def _broken_workload() -> batchscope.Workload:
    workload = resolve_workload("small-cnn-cifar10", **OPTIONS)

    def loss(model, batch):
        raise ValueError("the loss of this workload is broken")

    return workload.with_settings(loss=loss)


def _full_on_second_build(rank: int) -> batchscope.Workload:
    workload = resolve_workload("small-cnn-cifar10", **OPTIONS)
    builds = [0]

    def build_model(device):
        builds[0] += 1
        if rank == 1 and builds[0] == 2:  # the first build times the all-reduce
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return workload.build_model(device)

    return workload.with_settings(build_model=build_model)
