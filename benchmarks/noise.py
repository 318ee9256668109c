"""Gradient noise scale: batchscope's estimate against a brute-force reference, and the cost of
the online monitor, both measured in the same run.

    python benchmarks/noise.py [--out noise.json]      # GPU: resnet18-cifar10, ~3-5 minutes
    python benchmarks/noise.py --cpu-smoke              # CPU: small-cnn-cifar10, about a minute

What it does (GPU): trains the seed ResNet-18 at batch 512 (lr 0.1 * 512/128 = 0.4, linear warm-up
over the first epoch, then constant; one `workload.epoch_batches` pass per epoch) and at
initialisation and after 1, 2 and 4 epochs, with the parameters frozen:
- batchscope: `estimate_noise_scale(..., model=model)` (accumulation method, micro-batch 128 x 4);
- reference: many independent gradients at two batch sizes far apart (128 single passes and 2048
  accumulated from 16 micro-batches of 128, so BatchNorm sees the same 128-example batches as
  the estimator), mean squared norms over all draws -> unbiased |G|^2, tr(Sigma) and B_simple,
  with a bootstrap interval over the draws. It costs several times the estimator's passes.
Then the online monitor's overhead: training steps (4 micro-batches of 128, same batches reused
so data loading is not timed) without the monitor, with it measuring every step, and every 10th
step, interleaved in rounds so that clock drift hits all variants alike.

Batches are drawn without replacement inside each micro-batch, so E|G_b|^2 carries a finite-
population factor (N-b)/(N-1) on the noise term: 0.997 at b = 128 of 50,000, ignored.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchscope import step as steps
from batchscope.analysis.noise_stats import unbiased_components
from batchscope.device import resolve_device, synchronize
from batchscope.guard import StateGuard
from batchscope.probes.noise import estimate_noise_scale
from batchscope.probes.noise_online import GradientNoiseMonitor
from batchscope.record import environment_info, write_json_atomic
from batchscope.workloads import get_workload


@dataclass(frozen=True)
class Config:
    workload: str
    options: dict[str, Any]
    train_batch: int
    checkpoints: tuple[int, ...]  # epochs of training before each measurement
    micro: int  # estimator micro-batch (and reference small batch)
    accumulation: int
    estimator_steps: int
    reference_big: int
    reference_small_draws: int
    reference_big_draws: int
    overhead_steps: int
    overhead_rounds: int


GPU = Config("resnet18-cifar10", {"autocast": "bf16", "channels_last": True}, 512, (0, 1, 2, 4),
             128, 4, 64, 2048, 384, 48, 20, 4)
SMOKE = Config("small-cnn-cifar10", {"train_size": 1000, "test_size": 100}, 128, (0, 1),
               16, 4, 6, 128, 24, 4, 2, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="small-cnn-cifar10 on the CPU, tiny sizes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        config, device = SMOKE, torch.device("cpu")
    elif not torch.cuda.is_available():
        print("benchmarks/noise.py needs a CUDA GPU (or run it with --cpu-smoke)", file=sys.stderr)
        return 2
    else:
        config, device = GPU, resolve_device("cuda")
    torch.manual_seed(args.seed)
    workload = get_workload(config.workload, **config.options)
    model = steps.build_model(workload, device)
    base_lr = workload.reference_lr * config.train_batch / workload.reference_batch_size
    optimizer = workload.build_optimizer(model.parameters(), base_lr)
    rows = []
    trained = 0
    started = time.perf_counter()
    for epochs in config.checkpoints:
        train_seconds = train_epochs(workload, model, optimizer, base_lr, device, config, trained, epochs, args.seed)
        trained = epochs
        rows.append(measure(workload, model, device, config, epochs, train_seconds, args.seed))
        print_row(rows[-1], flush=True)
    overhead = monitor_overhead(workload, model, device, config)
    results = {
        "benchmark": "noise",
        "config": asdict(config),
        "environment": environment_info(device),
        "checkpoints": rows,
        "overhead": overhead,
        "seconds": time.perf_counter() - started,
    }
    print_table(rows, overhead)
    if args.out is not None:
        write_json_atomic(args.out, results)
        print(f"results written to {args.out}")
    return 0


# -- training between checkpoints -------------------------------------------------------------


def train_epochs(workload, model, optimizer, base_lr: float, device, config: Config, done: int, target: int,
                 seed: int) -> float:
    """Epochs done..target at batch config.train_batch: LR `base_lr` (linearly scaled from the
    reference) reached by a linear warm-up over the first epoch, constant after it."""
    if target == done:
        return 0.0
    steps_per_epoch = workload.dataset_size // config.train_batch
    synchronize(device)
    start = time.perf_counter()
    for epoch in range(done, target):
        for index, batch in enumerate(workload.epoch_batches(config.train_batch, device, seed + epoch)):
            progress = (epoch * steps_per_epoch + index + 1) / steps_per_epoch
            for group in optimizer.param_groups:
                group["lr"] = base_lr * min(1.0, progress)
            steps.train_step(workload, model, optimizer, batch, device)
    synchronize(device)
    return time.perf_counter() - start


# -- one checkpoint ---------------------------------------------------------------------------


def measure(workload, model, device, config: Config, epochs: int, train_seconds: float, seed: int) -> dict:
    estimate = estimate_noise_scale(
        workload, device, model=model, steps=config.estimator_steps, micro_batch_size=config.micro,
        accumulation=config.accumulation, seed=seed + 1000 + epochs,
    )
    reference = brute_force_reference(workload, model, device, config, seed + 2000 + epochs)
    ratio = estimate.b_simple / reference["b_simple"] if estimate.b_simple and reference["b_simple"] else None
    return {
        "epochs": epochs,
        "train_seconds": train_seconds,
        "estimate": estimate.to_dict(),
        "reference": reference,
        "ratio": ratio,
        "reference_in_estimate_ci": _inside(reference["b_simple"], estimate.ci_low, estimate.ci_high),
        "estimate_in_reference_ci": _inside(estimate.b_simple, reference["ci_low"], reference["ci_high"]),
        "estimator_passes": config.estimator_steps * config.accumulation,
        "reference_passes": reference["passes"],
    }


def brute_force_reference(workload, model, device, config: Config, seed: int) -> dict:
    """Independent draws of |G_b|^2 at b = micro and b = reference_big, then the two-size solve."""
    generator = torch.Generator().manual_seed(seed)
    micro_per_big = config.reference_big // config.micro
    start = time.perf_counter()
    with StateGuard(model, rng=True):
        small = [_batch_gradient_sq_norm(workload, model, device, config.micro, 1, generator)
                 for _ in range(config.reference_small_draws)]
        big = [_batch_gradient_sq_norm(workload, model, device, config.micro, micro_per_big, generator)
               for _ in range(config.reference_big_draws)]
    seconds = time.perf_counter() - start
    small_arr, big_arr = np.array(small), np.array(big)
    g2, trace = unbiased_components(config.micro, small_arr.mean(), config.reference_big, big_arr.mean())
    low, high = _bootstrap_interval(small_arr, big_arr, config.micro, config.reference_big)
    return {
        "b_simple": trace / g2 if g2 > 0 else None,
        "ci_low": low,
        "ci_high": high,
        "grad_sq_norm": g2,
        "trace_sigma": trace,
        "small_batch": config.micro,
        "big_batch": config.reference_big,
        "small_draws": len(small),
        "big_draws": len(big),
        "passes": len(small) + len(big) * micro_per_big,
        "seconds": seconds,
    }


def _batch_gradient_sq_norm(workload, model, device, micro: int, count: int, generator) -> float:
    """|mean gradient of `count` fresh micro-batches|^2, in float64 on the host."""
    model.zero_grad(set_to_none=True)
    for _ in range(count):
        steps.forward_backward(workload, model, workload.sample(micro, device, generator), device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads)
    value = float(torch.stack(norms).double().square().sum()) / count**2
    model.zero_grad(set_to_none=True)
    return value


def _bootstrap_interval(small: np.ndarray, big: np.ndarray, b_small: int, b_big: int,
                        resamples: int = 2000, confidence: float = 0.9) -> tuple[float | None, float | None]:
    rng = np.random.default_rng(0)
    small_means = small[rng.integers(0, small.size, (resamples, small.size))].mean(1)
    big_means = big[rng.integers(0, big.size, (resamples, big.size))].mean(1)
    g2, trace = unbiased_components(b_small, small_means, b_big, big_means)
    ratios = np.where(g2 > 0, trace / np.where(g2 > 0, g2, 1.0), np.inf)
    low, high = np.quantile(ratios, [(1 - confidence) / 2, (1 + confidence) / 2])
    return _finite(low), _finite(high)


# -- the online monitor's cost ----------------------------------------------------------------


def monitor_overhead(workload, model, device, config: Config) -> dict:
    """Seconds per training step (accumulation x micro) without / with the monitor."""
    model = copy.deepcopy(model)
    optimizer = workload.build_optimizer(model.parameters(), 1e-4)  # barely moves: same work each round
    generator = torch.Generator().manual_seed(123)
    batches = [workload.sample(config.micro, device, generator) for _ in range(config.accumulation)]
    variants = {"off": None, "every_1": 1, "every_10": 10}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(config.overhead_rounds + 1):  # round 0 is warm-up, not recorded
        for name, every in variants.items():
            monitor = GradientNoiseMonitor(model, config.micro, every=every) if every else None
            seconds = _timed_steps(workload, model, optimizer, batches, device, monitor, config.overhead_steps)
            if monitor is not None:
                monitor.close()
            if round_index > 0:
                timings[name].append(seconds / config.overhead_steps)
    base = statistics.median(timings["off"])
    result: dict[str, Any] = {"step_seconds": {k: statistics.median(v) for k, v in timings.items()},
                              "rounds": config.overhead_rounds, "steps_per_round": config.overhead_steps}
    result["overhead_fraction"] = {k: statistics.median(v) / base - 1.0 for k, v in timings.items() if k != "off"}
    return result


def _timed_steps(workload, model, optimizer, batches, device, monitor, count: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        for batch in batches:
            steps.forward_backward(workload, model, batch, device)
        if monitor is not None:
            monitor.step()
        steps.optimizer_step(optimizer)
    synchronize(device)
    return time.perf_counter() - start


# -- output -----------------------------------------------------------------------------------


def print_row(row: dict, flush: bool = False) -> None:
    est, ref = row["estimate"], row["reference"]
    print(
        f"epoch {row['epochs']}: estimate {_fmt(est['b_simple'])} [{_fmt(est['ci_low'])}, {_fmt(est['ci_high'])}] "
        f"({est['status']}, {est['seconds']:.1f}s) | reference {_fmt(ref['b_simple'])} "
        f"[{_fmt(ref['ci_low'])}, {_fmt(ref['ci_high'])}] ({ref['seconds']:.1f}s) | ratio {_fmt(row['ratio'])}",
        flush=flush,
    )


def print_table(rows: list[dict], overhead: dict) -> None:
    header = f"{'epochs':>6} {'estimate':>9} {'est. 90% CI':>21} {'reference':>10} {'ref. 90% CI':>21} " \
             f"{'ratio':>6} {'est s':>6} {'ref s':>6}"
    print("\nGradient noise scale B_simple (examples): batchscope vs brute force at the same parameters")
    print(header)
    for row in rows:
        est, ref = row["estimate"], row["reference"]
        print(f"{row['epochs']:>6} {_fmt(est['b_simple']):>9} {_interval(est):>21} {_fmt(ref['b_simple']):>10} "
              f"{_interval(ref):>21} {_fmt(row['ratio']):>6} {est['seconds']:>6.1f} {ref['seconds']:>6.1f}")
    print("\nOnline monitor overhead (same run, same batches, median over rounds)")
    base = overhead["step_seconds"]["off"]
    print(f"  without monitor: {base * 1e3:.2f} ms/step")
    for name, fraction in overhead["overhead_fraction"].items():
        print(f"  {name:>9}: {overhead['step_seconds'][name] * 1e3:.2f} ms/step ({fraction:+.1%})")


def _interval(data: dict) -> str:
    return f"[{_fmt(data['ci_low'])}, {_fmt(data['ci_high'])}]"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _inside(value: float | None, low: float | None, high: float | None) -> bool | None:
    if value is None or low is None or high is None:
        return None
    return low <= value <= high


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    sys.exit(main())
