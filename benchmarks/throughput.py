"""Throughput probe benchmark: the probe's knee and best batch size against an exhaustive sweep.

    python benchmarks/throughput.py --out runs/throughput-bench.json     # a CUDA GPU
    python benchmarks/throughput.py --cpu-smoke --out /tmp/smoke.json     # the harness on CPU

On a GPU, for the seed workload (ResNet-18 / CIFAR-10) in fp32 and in bf16 autocast with
channels_last, all in this one process:

- the memory limit: `probe_memory`'s recommended batch size (or --max-batch-size), timed
  separately because both methods below need it;
- the reference sweep: every power of two from 8 up to that limit (and the limit itself), each
  with 5 warm-up and 30 timed training steps, no early stop, no time cap;
- the probe: `measure_throughput` with its defaults (3 warm-up + 10 timed steps per size, early
  stop once the curve flattens), without the input-pipeline check (the sweep has none either).

Printed: each size's samples/s from both, then per precision the probe's best and knee against
the sweep's, the sweep's throughput *at the probe's best size* as a share of the sweep's best
(the sweep measures more precisely, so it is the judge of both), and the probe's wall time as a
share of the sweep's. The issue's bar: the probe's best reaches >= 95% of the sweep's best
throughput in <= 1/4 of the sweep's time. --out writes everything as JSON.

Before anything is timed, one untimed step at batch 8 per precision pays the process's one-time
costs (CUDA context, cuDNN handles, data decoding), so neither method is charged for them.

--cpu-smoke runs the same code on the CPU with the small CNN, a cap of 64 and fewer steps. It
exercises the harness; its numbers mean little (a CPU's throughput curve is flat for a small CNN
and a shared CPU is noisy).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from batchscope.probes.throughput import ThroughputResult, geometric_grid, measure_throughput
from batchscope.record import environment_info, write_json_atomic
from batchscope.workloads import get_workload

TARGET_SHARE_OF_BEST = 0.95
TARGET_TIME_SHARE = 0.25


@dataclass(frozen=True)
class Setup:
    workload: str
    options: dict[str, Any]
    modes: dict[str, dict[str, Any]]
    sweep_warmup: int
    sweep_timed: int
    probe_kwargs: dict[str, Any]
    default_cap: int | None


GPU = Setup(
    workload="resnet18-cifar10",
    options={},
    modes={"fp32": {}, "bf16+channels_last": {"autocast": "bf16", "channels_last": True}},
    sweep_warmup=5,
    sweep_timed=30,
    probe_kwargs={},
    default_cap=None,
)
SMOKE = Setup(
    workload="small-cnn-cifar10",
    options={"train_size": 512, "test_size": 64},
    modes={"fp32": {}, "bf16+channels_last": {"autocast": "bf16", "channels_last": True}},
    sweep_warmup=2,
    sweep_timed=8,
    probe_kwargs={"warmup_steps": 1, "timed_steps": 4},
    default_cap=64,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="small CNN on the CPU")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="skip the memory probe and use this limit for both methods")
    parser.add_argument("--sweep-timed-steps", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        setup, device = SMOKE, torch.device("cpu")
    elif not torch.cuda.is_available():
        print("benchmarks/throughput.py needs a CUDA GPU (none is visible); to exercise the "
              "harness on the CPU use --cpu-smoke", file=sys.stderr)
        return 2
    else:
        setup, device = GPU, torch.device("cuda")
    sweep_timed = args.sweep_timed_steps or setup.sweep_timed

    rows = []
    for mode, mode_options in setup.modes.items():
        workload = get_workload(setup.workload, **setup.options, **mode_options)
        measure_throughput(workload, batch_sizes=[8], device=device, warmup_steps=1,
                           timed_steps=1, data_path=False)  # one-time costs, untimed

        cap, memory_seconds = _memory_limit(workload, device, args.max_batch_size or
                                            setup.default_cap)
        probe = measure_throughput(workload, device=device, max_batch_size=cap, data_path=False,
                                   **setup.probe_kwargs)
        sweep = measure_throughput(workload, batch_sizes=geometric_grid(cap), device=device,
                                   warmup_steps=setup.sweep_warmup, timed_steps=sweep_timed,
                                   early_stop=False, data_path=False, max_seconds_per_point=None)
        rows.append(_compare(mode, cap, memory_seconds, probe, sweep))
        _print_curves(mode, probe, sweep)

    _print_summary(rows)
    if args.out:
        write_json_atomic(args.out, {
            "benchmark": "throughput",
            "environment": environment_info(device),
            "workload": setup.workload,
            "options": setup.options,
            "sweep": {"warmup_steps": setup.sweep_warmup, "timed_steps": sweep_timed},
            "targets": {"share_of_best": TARGET_SHARE_OF_BEST, "time_share": TARGET_TIME_SHARE},
            "modes": rows,
        })
        print(f"\nwritten: {args.out}")
    return 0


def _memory_limit(workload: Any, device: torch.device, given: int | None) -> tuple[int, float]:
    if given is not None:
        return given, 0.0
    from batchscope.probes.memory import probe_memory

    started = time.perf_counter()
    result = probe_memory(workload, device=device)
    return int(result.recommended_batch_size), time.perf_counter() - started


def _compare(mode: str, cap: int, memory_seconds: float, probe: ThroughputResult,
             sweep: ThroughputResult) -> dict[str, Any]:
    sweep_rate = {point.batch_size: point.samples_per_s for point in sweep.points}
    sweep_best = sweep.curve.best_samples_per_s
    at_probe_best = sweep_rate[probe.best_batch_size]
    share = at_probe_best / sweep_best
    time_share = probe.seconds / sweep.seconds
    return {
        "mode": mode,
        "max_batch_size": cap,
        "memory_probe_seconds": memory_seconds,
        "sweep_best_batch_size": sweep.best_batch_size,
        "sweep_best_samples_per_s": sweep_best,
        "sweep_knee_batch_size": sweep.knee_batch_size,
        "probe_best_batch_size": probe.best_batch_size,
        "probe_knee_batch_size": probe.knee_batch_size,
        "probe_best_samples_per_s_own": probe.curve.best_samples_per_s,
        "sweep_samples_per_s_at_probe_best": at_probe_best,
        "probe_best_share_of_sweep_best": share,
        "sweep_samples_per_s_at_probe_knee": sweep_rate[probe.knee_batch_size],
        "probe_seconds": probe.seconds,
        "sweep_seconds": sweep.seconds,
        "probe_time_share": time_share,
        "probe_stop_reason": probe.stop_reason,
        "probe_sizes": [point.batch_size for point in probe.points],
        "meets_bar": share >= TARGET_SHARE_OF_BEST and time_share <= TARGET_TIME_SHARE,
        "probe": probe.to_dict(),
        "sweep": sweep.to_dict(),
    }


def _print_curves(mode: str, probe: ThroughputResult, sweep: ThroughputResult) -> None:
    probe_rate = {point.batch_size: point for point in probe.points}
    print(f"\n== {mode}: samples/s per batch size (sweep: {sweep.timed_steps} timed steps each; "
          f"probe: {probe.timed_steps}, early stop) ==")
    print(f"{'batch':>7} {'sweep':>12} {'spread':>7} {'probe':>12} {'spread':>7} {'probe/sweep':>11}")
    for point in sweep.points:
        mine = probe_rate.get(point.batch_size)
        probe_cells = (f"{mine.samples_per_s:12.1f} {mine.spread:7.1%} "
                       f"{mine.samples_per_s / point.samples_per_s:11.3f}"
                       if mine is not None else f"{'-':>12} {'-':>7} {'-':>11}")
        print(f"{point.batch_size:>7} {point.samples_per_s:12.1f} {point.spread:7.1%} "
              f"{probe_cells}")
    if probe.stop_reason:
        print(f"probe stopped: {probe.stop_reason}")


def _print_summary(rows: list[dict[str, Any]]) -> None:
    print("\n== probe vs exhaustive sweep ==")
    header = (f"{'mode':<20} {'limit':>6} {'sweep best':>10} {'probe best':>10} "
              f"{'% of best':>9} {'sweep knee':>10} {'probe knee':>10} {'sweep s':>8} "
              f"{'probe s':>8} {'time %':>7} {'bar':>4}")
    print(header)
    for row in rows:
        print(f"{row['mode']:<20} {row['max_batch_size']:>6} {row['sweep_best_batch_size']:>10} "
              f"{row['probe_best_batch_size']:>10} {row['probe_best_share_of_sweep_best']:>9.1%} "
              f"{row['sweep_knee_batch_size']:>10} {row['probe_knee_batch_size']:>10} "
              f"{row['sweep_seconds']:>8.1f} {row['probe_seconds']:>8.1f} "
              f"{row['probe_time_share']:>7.1%} {'yes' if row['meets_bar'] else 'NO':>4}")
    print(f"bar: probe's best >= {TARGET_SHARE_OF_BEST:.0%} of the sweep's best throughput "
          f"(judged on the sweep's measurements) in <= {TARGET_TIME_SHARE:.0%} of its time; "
          f"memory probe time (shared by both) not counted: "
          + ", ".join(f"{row['mode']} {row['memory_probe_seconds']:.1f} s" for row in rows))
    if len(rows) == 2:
        base, fast = rows
        print(f"{fast['mode']} vs {base['mode']}: best throughput "
              f"{fast['sweep_best_samples_per_s'] / base['sweep_best_samples_per_s']:.2f}x "
              f"(sweep), knee {base['sweep_knee_batch_size']} -> {fast['sweep_knee_batch_size']}")


if __name__ == "__main__":
    sys.exit(main())
