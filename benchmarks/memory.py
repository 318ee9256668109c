"""Memory probe benchmark: batchscope vs Accelerate vs Lightning vs a fine bisection.

    python benchmarks/memory.py --out runs/memory-bench.json            # a CUDA GPU
    python benchmarks/memory.py --cpu-smoke --memory-budget 96MiB --out /tmp/smoke.json

(batchscope must be importable: installed, or PYTHONPATH=src; the CIFAR-10 archive is found as
the workloads find it, e.g. through BATCHSCOPE_CIFAR10.)

On a GPU, for the seed workload (ResNet-18 / CIFAR-10) in fp32 and in bf16 autocast with
channels_last, every method looks for the largest batch whose training steps fit, all in this
one process, each trial being 3 real training steps (forward, backward, optimizer step):

- batchscope.probe_memory (model-based search, 2% tolerance);
- Accelerate's find_executable_batch_size, starting at 65536 and multiplying by 0.9 after each
  OOM (the real one from accelerate.utils when installed, else a re-implementation, labelled);
- Lightning's Tuner.scale_batch_size, with its defaults and with max_val raised (skipped, with
  the reason printed, when lightning is not installed);
- ground truth: doubling from 256 until a trial fails, then bisection down to a gap of 0.2%
  (or 1), finer than any method's tolerance.

Printed: the size each found as % of the ground truth, probes, wall time and wall time relative
to batchscope's; --out writes the same as JSON. Data: a 5,000-image subset, with the dataset cap
lifted (a batch's memory does not depend on which images fill it, and the CIFAR source serves
batches larger than the subset).

--cpu-smoke runs the same code on CPU with a tiny synthetic conv workload, where "out of
memory" means the measured peak resident memory exceeded --memory-budget (a simulated OOM with
the CPU allocator's wording, which Accelerate and Lightning both recognise). It exercises the
harness; its numbers mean little: memory that earlier methods freed stays resident and is
reused, so a method that runs later in the process measures smaller peaks (the ground truth,
which runs last, comes out lenient).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from batchscope import device as devices
from batchscope import step
from batchscope.oom import run_catching_oom
from batchscope.probes.memory import DEFAULT_MARGIN, parse_size, probe_memory, recommended_batch_size
from batchscope.probes.memory_runner import DeviceMemoryMeter
from batchscope.workload import Workload

STEPS_PER_TRIAL = 3
ACCELERATE_START = 65536
GROUND_TRUTH_START = 256
SIMULATED_OOM = "DefaultCPUAllocator: can't allocate memory: peak {peak} bytes exceeds the " \
                "benchmark's budget of {budget} bytes (simulated out-of-memory)"


@dataclass
class MethodResult:
    variant: str
    method: str
    found: int | None
    probes: int
    seconds: float
    sizes: list[int] = field(default_factory=list)
    note: str = ""
    percent_of_truth: float | None = None
    time_vs_batchscope: float | None = None


# -- one trial: 3 real steps; an OOM propagates (real on GPU, simulated on CPU smoke) ----------


class Trial:
    """Runs STEPS_PER_TRIAL training steps at a batch size on one model, recording every size
    tried. With a `budget` (CPU smoke) a measured peak above it raises a simulated OOM."""

    def __init__(self, workload: Workload, device: torch.device, budget: int | None) -> None:
        self.workload, self.device, self.budget = workload, device, budget
        self.sizes: list[int] = []
        self.meter = DeviceMemoryMeter(device, relative=budget is not None)
        self.model = step.build_model(workload, device)
        before = devices.current_memory_bytes(device)
        run_catching_oom(lambda: self._steps(1, steps=1), device)  # one-time allocations
        self.meter.exclude_growth_since(before)

    def __call__(self, batch_size: int) -> int:
        self.sizes.append(batch_size)
        peak = self._steps(batch_size, STEPS_PER_TRIAL)
        if self.budget is not None and peak > self.budget:
            raise RuntimeError(SIMULATED_OOM.format(peak=peak, budget=self.budget))
        return batch_size

    def _steps(self, batch_size: int, steps: int) -> int:
        workload, device = self.workload, self.device
        try:
            optimizer = workload.build_optimizer(self.model.parameters(), workload.reference_lr)
            self.meter.reset()
            batch = workload.worst_case(batch_size, device)
            for _ in range(steps):
                step.train_step(workload, self.model, optimizer, batch, device)
            devices.synchronize(device)
            return self.meter.peak_bytes()
        finally:
            self.model.zero_grad(set_to_none=True)

    def fits(self, batch_size: int) -> bool:
        outcome = run_catching_oom(lambda: self(batch_size), self.device)
        if outcome.oom:
            return False
        devices.release_memory(self.device)
        return True


# -- the methods -------------------------------------------------------------------------------


def run_batchscope(variant: str, workload: Workload, device: torch.device,
                   budget: int | None) -> MethodResult:
    started = time.perf_counter()
    result = probe_memory(workload, device=device, memory_budget=budget, margin=0.0,
                          steps=STEPS_PER_TRIAL)
    seconds = time.perf_counter() - started
    return MethodResult(variant, "batchscope", result.max_batch_size, len(result.probes),
                        seconds, [p.batch_size for p in result.probes], result.note)


def warm_up(workload: Workload, device: torch.device) -> None:
    from batchscope.step import build_model, train_step

    model = build_model(workload, device)
    optimizer = workload.build_optimizer(model.parameters(), workload.reference_lr)
    generator = torch.Generator().manual_seed(0)
    train_step(workload, model, optimizer, workload.sample(8, device, generator), device)
    devices.synchronize(device)
    del model, optimizer
    devices.release_memory(device)


def follow_up_epoch(workload: Workload, device: torch.device, batch_size: int) -> dict[str, Any]:
    """The issue's proof that the recommendation is usable: one full training epoch at the
    recommended batch (fresh model and optimizer, the workload's own data path), then the
    test-set evaluation, with the peak memory of both."""
    from batchscope.step import build_model, train_step

    devices.release_memory(device)
    devices.reset_peak_memory(device)
    started = time.perf_counter()
    model = build_model(workload, device)
    optimizer = workload.build_optimizer(model.parameters(), workload.reference_lr)
    steps = 0
    for batch in workload.epoch_batches(batch_size, device, 0):
        train_step(workload, model, optimizer, batch, device)
        steps += 1
    devices.synchronize(device)
    accuracy = workload.evaluate(model, device) if workload.evaluate is not None else None
    devices.synchronize(device)
    peak = devices.peak_memory_bytes(device)
    del model, optimizer
    devices.release_memory(device)
    return {"batch_size": batch_size, "steps": steps, "accuracy": accuracy,
            "peak_bytes": peak, "seconds": time.perf_counter() - started}


def run_ground_truth(variant: str, workload: Workload, device: torch.device,
                     budget: int | None, start: int) -> MethodResult:
    started = time.perf_counter()
    trial = Trial(workload, device, budget)
    lo, hi = 0, start
    while trial.fits(hi):  # double until a trial fails ...
        lo, hi = hi, hi * 2
    lo, hi = _bisect(trial, lo, hi)  # ... then bisect to a gap of 0.2%
    seconds = time.perf_counter() - started
    return MethodResult(variant, "ground truth (doubling + bisection)", lo or None,
                        len(trial.sizes), seconds, trial.sizes)


def _bisect(trial: Trial, lo: int, hi: int) -> tuple[int, int]:
    while hi - lo > max(1, lo // 512):
        middle = (lo + hi) // 2
        lo, hi = (middle, hi) if trial.fits(middle) else (lo, middle)
    return lo, hi


def run_accelerate(variant: str, workload: Workload, device: torch.device,
                   budget: int | None, start: int) -> MethodResult:
    started = time.perf_counter()
    trial = Trial(workload, device, budget)
    try:
        from accelerate.utils import find_executable_batch_size
    except ImportError:
        found, label = _accelerate_style(trial, start), "accelerate-style x0.9 (re-implemented)"
    else:
        kwargs: dict[str, Any] = {"starting_batch_size": start}
        if "reduce_batch_size_fn" in inspect.signature(find_executable_batch_size).parameters:
            # Newer accelerate takes the reduction as a function of no arguments that
            # returns the next size; pin x0.9 so every version compares alike.
            state = {"size": start}

            def times_0_9() -> int:
                state["size"] = int(state["size"] * 0.9)
                return state["size"]

            kwargs["reduce_batch_size_fn"] = times_0_9
            label = "accelerate find_executable_batch_size (x0.9)"
        else:
            label = "accelerate find_executable_batch_size (its own reduction)"
        found = find_executable_batch_size(trial, **kwargs)()
    seconds = time.perf_counter() - started
    return MethodResult(variant, label, found, len(trial.sizes), seconds, trial.sizes)


def _accelerate_style(trial: Trial, start: int) -> int | None:
    batch_size = start
    while batch_size > 0:
        if trial.fits(batch_size):
            return batch_size
        batch_size = int(batch_size * 0.9)
    return None


def run_lightning(variant: str, workload: Workload, device: torch.device, budget: int | None,
                  max_val: int | None) -> MethodResult:
    label = "lightning Tuner.scale_batch_size" + (
        " (defaults)" if max_val is None else f" (max_val={max_val})")
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.tuner import Tuner
    except ImportError as exc:
        return MethodResult(variant, label, None, 0, 0.0, note=f"skipped: {exc}")
    started = time.perf_counter()
    trial = Trial(workload, device, budget)
    module = _lightning_module(pl, trial)
    precision = "bf16-mixed" if workload.autocast_dtype == torch.bfloat16 else "32-true"
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
            precision=precision, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        parameters = inspect.signature(Tuner.scale_batch_size).parameters
        kwargs: dict[str, Any] = {"steps_per_trial": STEPS_PER_TRIAL}
        note = ""
        if max_val is not None:
            if "max_val" not in parameters:
                return MethodResult(variant, label, None, 0, 0.0,
                                    note="skipped: this lightning has no max_val")
            kwargs["max_val"] = max_val
        if "margin" in parameters:
            note = f"lightning's default margin {parameters['margin'].default} applied"
        found = Tuner(trainer).scale_batch_size(module, **kwargs)
    seconds = time.perf_counter() - started
    return MethodResult(variant, label, found, len(trial.sizes), seconds, trial.sizes, note)


def _lightning_module(pl: Any, trial: Trial) -> Any:
    """A LightningModule running the trial's model on the trial's batches; each Lightning
    trial is recorded in trial.sizes when its first step starts."""
    workload, device = trial.workload, trial.device

    class Batches(torch.utils.data.IterableDataset):
        def __init__(self, batch_size: int) -> None:
            self.batch_size = batch_size

        def __iter__(self) -> Any:
            while True:
                yield workload.worst_case(self.batch_size, device)

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = trial.model
            self.batch_size = 2

        def train_dataloader(self) -> Any:
            trial.meter.reset()
            return torch.utils.data.DataLoader(Batches(self.batch_size), batch_size=None)

        def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
            if batch_index == 0:  # a trial that runs steps (Lightning also builds loaders
                trial.sizes.append(self.batch_size)  # it never iterates: not probes)
            return workload.loss(self.net, batch)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
            if trial.budget is not None:
                peak = trial.meter.peak_bytes()
                if peak > trial.budget:
                    raise RuntimeError(SIMULATED_OOM.format(peak=peak, budget=trial.budget))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return workload.build_optimizer(self.parameters(), workload.reference_lr)

    return Probe()


# -- workloads ---------------------------------------------------------------------------------


def gpu_variants() -> list[tuple[str, Workload]]:
    from batchscope.workloads import get_workload

    def seed(**options: Any) -> Workload:
        workload = get_workload("resnet18-cifar10", train_size=5000, test_size=100, **options)
        return workload.with_settings(dataset_size=None)

    return [("fp32", seed()), ("bf16 + channels_last", seed(autocast="bf16",
                                                              channels_last=True))]


def smoke_variants() -> list[tuple[str, Workload]]:
    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
        images = torch.randn(batch_size, 3, 16, 16, generator=generator)
        labels = torch.randint(0, 10, (batch_size,), generator=generator)
        return images.to(device), labels.to(device)

    workload = Workload(
        name="smoke-conv",
        build_model=lambda device: nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(64 * 16 * 16, 10)).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        make_batch=make_batch, reference_batch_size=32, reference_lr=0.01,
    )
    return [("cpu smoke", workload)]


# -- driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the harness")
    parser.add_argument("--memory-budget", help="CPU smoke budget, e.g. 96MiB")
    parser.add_argument("--variant", action="append",
                        help="run only this variant (repeatable): fp32, 'bf16 + channels_last'")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        if args.memory_budget is None:
            parser.error("--cpu-smoke needs --memory-budget (e.g. 96MiB)")
        device, budget = torch.device("cpu"), parse_size(args.memory_budget)
        variants, accelerate_start, truth_start = smoke_variants(), 2048, 16
        raised_max_val = 1 << 14
    else:
        if not torch.cuda.is_available():
            print("benchmarks/memory.py needs a CUDA GPU (none is visible); for a CPU run of "
                  "the harness use --cpu-smoke --memory-budget 96MiB", file=sys.stderr)
            return 2
        device, budget = torch.device("cuda"), None
        variants, accelerate_start, truth_start = gpu_variants(), ACCELERATE_START, \
            GROUND_TRUTH_START
        raised_max_val = 1 << 20

    if args.variant:
        unknown = set(args.variant) - {name for name, _ in variants}
        if unknown:
            parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {[n for n, _ in variants]}")
        variants = [(name, w) for name, w in variants if name in args.variant]
    results: list[MethodResult] = []
    follow_ups: dict[str, dict[str, Any]] = {}
    for variant, workload in variants:
        # One untimed step first: data decoding, the CUDA context and cuDNN handles are the
        # process's one-time costs, not any method's; whichever ran first would pay them.
        warm_up(workload, device)
        runs: list[Callable[[], MethodResult]] = [
            partial(run_batchscope, variant, workload, device, budget),
            partial(run_accelerate, variant, workload, device, budget, accelerate_start),
            partial(run_lightning, variant, workload, device, budget, None),
            partial(run_lightning, variant, workload, device, budget, raised_max_val),
            partial(run_ground_truth, variant, workload, device, budget, truth_start),
        ]
        variant_results = []
        for run in runs:
            devices.release_memory(device)
            outcome = run()
            variant_results.append(outcome)
            print(f"[{variant}] {outcome.method}: {outcome.found} in {outcome.probes} probes, "
                  f"{outcome.seconds:.1f}s {outcome.note}", file=sys.stderr, flush=True)
        _compare(variant_results)
        results.extend(variant_results)
        found = next(r.found for r in variant_results if r.method == "batchscope")
        if found and workload.epoch_batches is not None:
            # The probes ran on a 5,000-image subset; the epoch runs on the full training set.
            from batchscope.workloads import get_workload

            full = get_workload(
                "resnet18-cifar10", channels_last=workload.channels_last,
                autocast="bf16" if workload.autocast_dtype == torch.bfloat16 else None)
            size = min(recommended_batch_size(found, DEFAULT_MARGIN), full.dataset_size or found)
            check = follow_up_epoch(full, device, size)
            follow_ups[variant] = check
            print(f"[{variant}] follow-up: one epoch ({check['steps']} steps) at the recommended "
                  f"batch {size} + evaluation: no OOM, peak {check['peak_bytes'] / 2**30:.2f} GiB, "
                  f"accuracy {check['accuracy']}, {check['seconds']:.1f}s", file=sys.stderr, flush=True)
    _print_table(results, device)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": devices.device_name(device), "torch": torch.__version__,
                   "steps_per_trial": STEPS_PER_TRIAL, "results": [asdict(r) for r in results],
                   "follow_up_epochs": follow_ups}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _compare(results: list[MethodResult]) -> None:
    truth = results[-1].found
    ours = results[0].seconds
    for result in results:
        if truth and result.found is not None:
            result.percent_of_truth = round(100.0 * result.found / truth, 1)
        if result.probes and ours > 0:
            result.time_vs_batchscope = round(result.seconds / ours, 2)


def _print_table(results: list[MethodResult], device: torch.device) -> None:
    print(f"\nLargest batch that fits ({devices.device_name(device)}, {STEPS_PER_TRIAL} steps "
          f"per trial)")
    header = f"{'variant':<22} {'method':<52} {'found':>7} {'% truth':>8} {'probes':>7} " \
             f"{'wall s':>8} {'time / bs':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        found = "-" if r.found is None else str(r.found)
        percent = "-" if r.percent_of_truth is None else f"{r.percent_of_truth:.1f}"
        ratio = "-" if r.time_vs_batchscope is None else f"{r.time_vs_batchscope:.2f}x"
        print(f"{r.variant:<22} {r.method:<52} {found:>7} {percent:>8} {r.probes:>7} "
              f"{r.seconds:>8.1f} {ratio:>9}")
        if r.note.startswith("skipped") or r.note.startswith("capped"):
            print(f"{'':<22}   {r.note}")


if __name__ == "__main__":
    sys.exit(main())
