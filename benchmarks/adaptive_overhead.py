"""What the adaptive controller costs a training step: plain steps vs AdaptiveBatchSize steps.

    python benchmarks/adaptive_overhead.py --bf16 --out runs/adaptive-overhead.json   # a CUDA GPU
    python benchmarks/adaptive_overhead.py --cpu-smoke                                  # plumbing

(batchscope importable: installed, or PYTHONPATH=src; the CIFAR-10 archive found as the
workloads find it.)

adaptive_vs_fixed.py's first device run had the adaptive run's epochs about 12% slower than the
fixed run's before its batch ever changed (ResNet-18 / CIFAR-10 at batch 512, bf16, H200). This
script separates the causes, in one process, on the same batches and the same batch size (tune's
recommendation; the controller never changes it here):

- plain: the batch, forward + backward, optimizer step (the fixed run's loop);
- plain + a host sync every 10th step (what reading a measured step's numbers costs a loop
  that never waits for the device otherwise);
- adaptive, never measuring (`measure_every` past the run): the LR set every step, the
  controller's bookkeeping, the monitor's gradient hooks idle;
- adaptive at its default (`measure_every` 10): measured steps split into two micro-batches;
- adaptive measuring every step;
- adaptive at from_tune's own spacing, chosen from tune's throughput model so that the split
  costs at most 3% of training time (`BatchSizePolicy.measurement_interval`; printed).

The variants alternate over `--rounds` rounds of `--steps` timed steps each (after warm-up
steps), each from a fresh model with the same seed. Printed: the median milliseconds per step
of each variant and its ratio to plain's, measured in the same run. --cpu-smoke runs the small
CNN on the CPU (plumbing only: no device to wait for, so its numbers mean little).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path (tests)
import adaptive_vs_fixed as avf  # noqa: E402  (setups and the indexed batches)
import tune_vs_reference as tvr  # noqa: E402  (warm-up, tune, output helpers)
from batchscope import device as devices  # noqa: E402
from batchscope.adaptive import AdaptiveBatchSize  # noqa: E402
from batchscope.record import environment_info  # noqa: E402
from batchscope.step import build_model, forward_backward, needs_grad_scaler, optimizer_step  # noqa: E402
from batchscope.sweep.trial import seed_everything  # noqa: E402
from batchscope.workloads import get_workload  # noqa: E402

NEVER = 10**9  # a measure_every / decide_every no run reaches
SYNC_EVERY = 10
# (label, controller options or None for the plain loop, sync every this many steps or None)
VARIANTS: tuple[tuple[str, dict[str, int] | None, int | None], ...] = (
    ("plain", None, None),
    (f"plain + host sync every {SYNC_EVERY}", None, SYNC_EVERY),
    ("adaptive, never measuring", {"measure_every": NEVER}, None),
    ("adaptive, measuring 1 in 10", {"measure_every": 10}, None),
    ("adaptive, measuring every step", {"measure_every": 1}, None),
    ("adaptive, from_tune's spacing", {}, None),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps a round (GPU 100)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--budget", type=float, default=15.0, help="tune's budget in seconds (15)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast + channels_last")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="small CNN on the CPU, few steps: checks the plumbing only")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not tvr.cuda_or_say("adaptive_overhead"):
        return 2
    setup = avf.SMOKE if args.cpu_smoke else avf.GPU
    steps = args.steps or (6 if args.cpu_smoke else 100)
    warmup = args.warmup if args.warmup is not None else (2 if args.cpu_smoke else 10)
    if min(steps, args.rounds) < 1 or warmup < 0:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0")
    options = dict(setup.options)
    if args.bf16:
        options.update(autocast="bf16", channels_last=True)
    workload = get_workload(setup.workload, **options)
    device = devices.resolve_device(args.device or setup.device)
    budget = 10.0 if args.cpu_smoke else args.budget

    tvr.pay_one_time_costs(workload, device)
    tuned, tune_seconds = tvr.run_tune(workload, device, budget, None)
    batch_size = tuned.recommendation.batch_size
    tvr.say(f"tune: {tune_seconds:.1f} s -> batch {batch_size}; timing {args.rounds} rounds of "
            f"{steps} steps (+{warmup} warm-up) per variant")

    timings: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
    spacing: dict[str, int | None] = {}
    for round_index in range(args.rounds):
        for label, controller, sync_every in VARIANTS:
            seconds, spacing[label] = _time_steps(workload, tuned, device, batch_size, controller,
                                                  sync_every, steps, warmup, seed=round_index)
            timings[label].append(seconds / steps)
    plain = statistics.median(timings["plain"])
    rows = [{"variant": label, "measure_every": spacing[label],
             "ms_per_step": 1e3 * statistics.median(per_step),
             "rounds_ms": [1e3 * s for s in per_step],
             "ratio_to_plain": statistics.median(per_step) / plain}
            for label, per_step in timings.items()]
    _print(workload.name, device, batch_size, rows, args.cpu_smoke)
    if args.out is not None:
        tvr.saver(args.out, {"benchmark": "adaptive_overhead", "environment": environment_info(device),
                             "workload": workload.describe(), "batch_size": batch_size,
                             "tune_seconds": tune_seconds, "steps": steps, "warmup": warmup,
                             "rounds": args.rounds, "bf16": args.bf16,
                             "cpu_smoke": args.cpu_smoke, "rows": rows})()
    return 0


def _time_steps(workload: Any, tuned: Any, device: torch.device, batch_size: int,
                controller: dict[str, int] | None, sync_every: int | None, steps: int,
                warmup: int, seed: int) -> tuple[float, int | None]:
    """Seconds for `steps` steps after `warmup` untimed ones, from a fresh model, and the
    controller's measure_every (None for the plain loop)."""
    seed_everything(seed, device)
    model = build_model(workload, device)
    optimizer = workload.build_optimizer(model.parameters(), tuned.recommendation.learning_rate)
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(workload, device) else None
    data = avf.IndexedBatches(workload, device)
    generator = torch.Generator().manual_seed(seed)
    order = data.permutation(generator)
    per_epoch = int(workload.dataset_size) // batch_size

    def batch_for(step: int) -> Any:
        start = (step % per_epoch) * batch_size
        return data.batch(order, list(range(start, start + batch_size)), generator)

    one_step: Callable[[Any], None]
    every = None
    if controller is None:
        def one_step(batch: Any) -> None:
            forward_backward(workload, model, batch, device, scaler)
            optimizer_step(optimizer, scaler)
    else:
        adaptive = AdaptiveBatchSize.from_tune(
            tuned, model, optimizer, epochs=1000, dataset_size=workload.dataset_size,
            scaler=scaler, decide_every=NEVER, **controller)
        every = adaptive.monitor.every

        def one_step(batch: Any) -> None:
            for micro, weight in adaptive.micro_batches(batch):
                forward_backward(workload, model, micro, device, scaler, share=weight)
            adaptive.step()
            optimizer_step(optimizer, scaler)

    for step in range(warmup):
        one_step(batch_for(step))
    devices.synchronize(device)
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        one_step(batch_for(step))
        if sync_every and (step + 1) % sync_every == 0:
            devices.synchronize(device)
    devices.synchronize(device)
    return time.perf_counter() - started, every


def _print(name: str, device: torch.device, batch_size: int, rows: list[dict[str, Any]],
           smoke: bool) -> None:
    where = "CPU (smoke: plumbing only)" if smoke else devices.device_name(device)
    print(f"\n== {name} on {where}: the adaptive controller's cost per step at batch {batch_size} ==")
    print(f"{'variant':<36}{'1 in':>8}{'ms/step':>10}{'x plain':>10}   rounds (ms/step)")
    for row in rows:
        rounds = ", ".join(f"{ms:.2f}" for ms in row["rounds_ms"])
        every = "-" if row["measure_every"] in (None, NEVER) else str(row["measure_every"])
        print(f"{row['variant']:<36}{every:>8}{row['ms_per_step']:>10.2f}"
              f"{row['ratio_to_plain']:>10.3f}   {rounds}")


if __name__ == "__main__":
    raise SystemExit(main())
