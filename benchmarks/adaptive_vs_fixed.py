"""Does growing the batch during training (`batchscope.adaptive`) reach the target sooner than
training at tune's fixed recommendation?

    PYTHONPATH=src python benchmarks/adaptive_vs_fixed.py --out runs/adaptive.json   # CUDA
    PYTHONPATH=src python benchmarks/adaptive_vs_fixed.py --cpu-smoke                # harness

All in this one process, on one workload (default the seed workload, ResNet-18 / CIFAR-10):

1. one untimed step pays the process's one-time costs, then `batchscope.tune(...)` runs once
   with --budget seconds (timed);
2. fixed: a fresh model trained --epochs epochs at the recommendation (batch, peak LR, warmup,
   the workload's schedule) through the sweep's trial runner, exactly as tune_vs_reference.py
   trains its recommended run;
3. adaptive: a fresh model (same seed, so the same initial weights) trained --epochs epochs by
   `AdaptiveBatchSize.from_tune(result, ...)` in a plain loop: it starts at the same batch and
   LR, measures the noise scale from its own gradients and may grow the batch (LR coupled,
   the schedule indexed by examples seen, so the run still ends after --epochs epochs).

Both runs evaluate with the workload's own `evaluate` after every epoch; times are *training*
seconds (the clock stops while the model is evaluated, synchronised the same way as the trial
runner), and each run's wall clock with evaluations and its untimed burn-in step is reported too.

Data of the adaptive run: the controller's batch sampler (`adaptive.batch_sampler`, unshuffled,
last partial batch dropped) cuts each epoch into batches of the current size; its positions
index the same per-epoch permutation, from the same seeded generator that then draws the
augmentation, as the workload's `epoch_batches` (the fixed run's). So until its first change the
adaptive run trains on exactly the fixed run's batches from the same initial weights; only its
measured steps differ (two or more micro-batches: BatchNorm sees smaller batches there). The
batches come from the workload's `batch_at` (the built-in CIFAR-10 workloads have it); any other
workload gets `make_batch` of the sampler's sizes (random batches, no epoch permutation; the
output says which).

Target: the fixed run's final accuracy minus --tolerance (0.5 points). Printed side by side:
final and best accuracy, training seconds, time to target, the adaptive run's batch changes
(step, examples seen, previous -> new batch, noise scale) and fixed / adaptive time to target.
--with-reference also trains the workload's reference recipe (as tune_vs_reference.py does) and
scores all runs against its final accuracy minus the tolerance, tuning time included;
--reference-metric X scores against a known reference accuracy X without training it.

--cpu-smoke runs the same code on the CPU with the small CNN on a 1,024-image subset, 2 epochs,
a 10 s tune budget and a controller that measures and decides often and moves for any predicted
gain, so the batch can change within so few steps. It checks the plumbing only; its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path (tests)
import tune_vs_reference as tvr  # noqa: E402  (the shared stages: warm-up, tune, plans, output)
from batchscope import device as devices  # noqa: E402
from batchscope.adaptive import AdaptiveBatchSize, save_adaptive_run  # noqa: E402
from batchscope.guard import StateGuard  # noqa: E402
from batchscope.oom import run_catching_oom  # noqa: E402
from batchscope.record import environment_info  # noqa: E402
from batchscope.step import (  # noqa: E402
    build_model, forward_backward, needs_grad_scaler, optimizer_step)
from batchscope.sweep.grid import GridPoint  # noqa: E402
# The trial runner's own burn-in and seeding: the adaptive run starts exactly as the fixed one.
from batchscope.sweep.trial import burn_in, evaluate_into, run_trial, seed_everything  # noqa: E402
from batchscope.sweep.trial_record import (  # noqa: E402
    EvalPoint, TrialRecord, TrialSettings, apply_target, summarise)
from batchscope.tuning import TuneResult  # noqa: E402
from batchscope.workload import Batch, Workload  # noqa: E402
from batchscope.workloads import get_workload  # noqa: E402

_pct, _num = tvr._pct, tvr._num  # the number formats of tune_vs_reference's table
GPU = tvr.Setup("resnet18-cifar10", {}, epochs=30, budget_s=120.0, device="cuda")
SMOKE = tvr.Setup("small-cnn-cifar10", {"train_size": 1024, "test_size": 256}, epochs=2,
                  budget_s=10.0, device="cpu")
# The smoke run has ~32 steps an epoch: the controller's defaults (measure 1 step in 10, decide
# every 50 after 8 samples) would decide about once. These settings decide often and move for
# any predicted gain, but on a 2-core CPU the small CNN's throughput barely grows past batch 32,
# so the smoke run usually keeps its batch; a change's plumbing is covered by the tests
# (tests/unit/adaptive, tests/integration/test_adaptive_*.py).
SMOKE_CONTROLLER: dict[str, Any] = {"measure_every": 2, "decide_every": 8, "min_samples": 3,
                                    "min_gain": 0.0}
SMOKE_NOTE = ("cpu-smoke: checks the plumbing only (small CNN, 1,024 images, 2 epochs); the "
              "numbers say nothing about adaptive vs fixed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=None,
                        help=f"built-in workload (default {GPU.workload}; smoke {SMOKE.workload})")
    parser.add_argument("--with-reference", action="store_true",
                        help="also train the workload's reference recipe and score every run "
                             "against its final accuracy minus the tolerance")
    parser.add_argument("--reference-metric", type=float, default=None,
                        help="a known final accuracy of the reference recipe (0-1) to score "
                             "against, without training it")
    for flag, what in (("--measure-every", "one step in this many is measured"),
                       ("--decide-every", "steps between batch-size decisions"),
                       ("--min-samples", "noise samples before the first decision")):
        parser.add_argument(flag, type=int, default=None,
                            help=f"adaptive controller: {what} (default: the controller's)")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="adaptive controller: the least predicted time-to-target saving "
                             "that moves the batch, e.g. 0.05 (default: the controller's)")
    parser.add_argument("--adaptive-out", type=Path, default=None,
                        help="directory for the adaptive run's own run.json and report.html")
    tvr.add_tune_and_train_arguments(
        parser, GPU, SMOKE, target_of="the fixed run's",
        smoke_help="small-cnn-cifar10 on the CPU, 2 epochs, 10 s budget (plumbing only)")
    args = parser.parse_args(argv)

    setup = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not tvr.cuda_or_say("adaptive_vs_fixed"):
        return 2
    epochs = args.epochs if args.epochs is not None else setup.epochs
    budget = args.budget if args.budget is not None else setup.budget_s
    if epochs <= 0:
        parser.error("--epochs must be a positive integer")
    if args.reference_metric is not None and not 0.0 < args.reference_metric <= 1.0:
        parser.error(f"--reference-metric {args.reference_metric!r} must be an accuracy in (0, 1]")
    controller = dict(SMOKE_CONTROLLER) if args.cpu_smoke else {}
    for name in ("measure_every", "decide_every", "min_samples", "min_gain"):
        if getattr(args, name) is not None:
            controller[name] = getattr(args, name)
    device = devices.resolve_device(args.device or setup.device)
    options = dict(setup.options) if args.workload in (None, setup.workload) else {}
    if args.bf16:
        options.update(autocast="bf16", channels_last=True)
    workload = get_workload(args.workload or setup.workload, **options)
    if workload.epoch_batches is None or workload.evaluate is None or not workload.dataset_size:
        parser.error(f"workload {workload.name!r} needs epoch_batches, evaluate and dataset_size")
    if args.cpu_smoke:
        tvr.say(SMOKE_NOTE)

    results: dict[str, Any] = {
        "benchmark": "adaptive_vs_fixed",
        "environment": environment_info(device),
        "workload": workload.describe(),
        "settings": {"epochs": epochs, "budget_s": budget, "tolerance_points": args.tolerance,
                     "seed": args.seed, "bf16": args.bf16, "cpu_smoke": args.cpu_smoke,
                     "controller": controller, "with_reference": args.with_reference,
                     "reference_metric": args.reference_metric},
    }
    save = tvr.saver(args.out, results)

    tvr.pay_one_time_costs(workload, device)
    tuned, tune_seconds = tvr.run_tune(workload, device, budget, args.tune_out)
    rec = tuned.recommendation
    results["tune"] = {"wall_seconds": tune_seconds, "recommendation": rec.to_dict(),
                       "record": tuned.to_dict()}
    save()
    tvr.say(f"tune: {tune_seconds:.1f} s -> batch {rec.batch_size}, LR {rec.learning_rate:.4g}, "
            f"warmup {rec.warmup_steps} steps, accumulation {rec.grad_accumulation}, noise scale "
            f"{_num(tuned.plan.noise_scale)}")

    plans = tvr.run_plans(workload, rec, epochs, 1, args.seed)  # [recommended, reference]
    runs: dict[str, TrialRecord] = {}
    results["runs"] = {}

    def keep(label: str, record: TrialRecord) -> None:
        runs[label] = record
        results["runs"][label] = record.to_dict()
        save()

    _, point, settings = plans[0]
    devices.release_memory(device)
    keep("fixed", run_trial(workload, point, settings, device,
                            on_eval=tvr.progress("fixed", epochs)))
    devices.release_memory(device)
    adaptive = run_adaptive(workload, tuned, epochs, args.seed, device, controller,
                            on_eval=tvr.progress("adaptive", epochs), out_dir=args.adaptive_out)
    keep("adaptive", adaptive)
    if args.with_reference:
        _, point, settings = plans[1]
        devices.release_memory(device)
        keep("reference", run_trial(workload, point, settings, device,
                                    on_eval=tvr.progress("reference", epochs)))

    summary = summarise_runs(runs, tune_seconds, args.tolerance, args.reference_metric)
    results["summary"] = summary
    results["runs"] = {label: record.to_dict() for label, record in runs.items()}
    save()
    print_table(runs, summary, workload, device, args.cpu_smoke)
    if args.out is not None:
        print(f"\nwritten: {args.out}")
    return 0


# -- the adaptive run -----------------------------------------------------------------------------


class IndexedBatches:
    """Batches for the adaptive sampler's positions within one epoch's permutation.

    A workload with `batch_at` (the built-in CIFAR-10 ones) is indexed exactly as its
    `epoch_batches` indexes itself: `permutation(generator)` is that epoch's order, and the same
    generator then draws each batch's augmentation. Any other workload gets `make_batch` of the
    same size: random batches, not a permutation."""

    def __init__(self, workload: Workload, device: torch.device) -> None:
        self.workload = workload
        self.device = device
        self.indexed = workload.batch_at is not None and workload.dataset_size is not None
        self.description = (
            "the sampler's cuts of epoch_batches' own per-epoch permutation, through the "
            "workload's batch_at" if self.indexed else
            "make_batch of the sampler's sizes: random batches, no epoch permutation")

    def permutation(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(int(self.workload.dataset_size), generator=generator)

    def batch(self, order: torch.Tensor, positions: list[int], generator: torch.Generator) -> Batch:
        if not self.indexed:
            return self.workload.make_batch(len(positions), self.device, generator)
        # The sampler is unshuffled: its positions are one contiguous run of the epoch's order.
        return self.workload.batch_at(order[positions[0]:positions[-1] + 1], self.device, generator)


def run_adaptive(workload: Workload, tuned: TuneResult, epochs: int, seed: int,
                 device: torch.device, controller: dict[str, Any],
                 on_eval: Callable[[EvalPoint, TrialRecord], bool] | None = None,
                 out_dir: Path | None = None) -> TrialRecord:
    """Train a fresh model with `AdaptiveBatchSize.from_tune`; the record has the trial
    runner's shape, with the controller's changes and decisions under `extra`; with `out_dir`
    the controller's own run record and report go there too."""
    rec = tuned.recommendation
    record = TrialRecord(key="adaptive", batch_size=rec.batch_size, lr_rule=rec.lr_rule,
                         learning_rate=rec.learning_rate, warmup_steps=rec.warmup_steps,
                         steps_per_epoch=workload.dataset_size // rec.batch_size, total_steps=0,
                         seed=seed)
    started = time.perf_counter()
    # As in run_trial: every RNG seeded here is restored afterwards, and an OOM ends the run
    # with that outcome after its memory is released.
    with StateGuard(rng=True):
        outcome = run_catching_oom(
            lambda: _train_adaptive(workload, tuned, epochs, seed, device, controller, record,
                                    on_eval, out_dir), device)
    if outcome.oom:
        record.outcome, record.message = "oom", outcome.message
    record.wall_seconds = time.perf_counter() - started
    summarise(record, TrialSettings(epochs, 1, seed), workload.higher_is_better)
    return record


def _train_adaptive(workload: Workload, tuned: TuneResult, epochs: int, seed: int,
                    device: torch.device, controller: dict[str, Any], record: TrialRecord,
                    on_eval: Callable[[EvalPoint, TrialRecord], bool] | None,
                    out_dir: Path | None) -> None:
    rec = tuned.recommendation
    data = IndexedBatches(workload, device)
    record.extra["data"] = data.description
    burn_in(workload, GridPoint(rec.batch_size, rec.lr_rule), device, rec.learning_rate,
             rec.per_device_batch_size if rec.grad_accumulation > 1 else None)
    seed_everything(seed, device)  # the trial runner's seeding: the same initial weights
    model = build_model(workload, device)
    optimizer = workload.build_optimizer(model.parameters(), rec.learning_rate)
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(workload, device) else None
    adaptive = AdaptiveBatchSize.from_tune(tuned, model, optimizer, epochs=epochs,
                                           dataset_size=workload.dataset_size, scaler=scaler,
                                           **controller)
    # Unshuffled and dropping the last partial batch: positions in the epoch's permutation drawn
    # below, so the examples of every epoch are those the fixed run's epoch_batches trains on.
    sampler = adaptive.batch_sampler(workload.dataset_size, shuffle=False, drop_last=True)
    decisions: list[dict[str, Any]] = []
    record.extra.update(changes=adaptive.changes, decisions=decisions, epoch_end_batch_sizes=[])
    loss_sum = torch.zeros((), device=device)
    loss_steps, train_seconds, shown_batch = 0, 0.0, rec.batch_size
    try:
        for epoch in range(epochs):
            devices.synchronize(device)
            clock = time.perf_counter()
            # The epoch's order and augmentation draws, seeded as the trial runner seeds the
            # workload's epoch_batches (the run's seed + the epoch).
            generator = torch.Generator().manual_seed(seed + epoch)
            order = data.permutation(generator)
            for positions in sampler:
                batch = data.batch(order, positions, generator)
                for micro, weight in adaptive.micro_batches(batch):
                    loss_sum += forward_backward(workload, model, micro, device, scaler,
                                                 share=weight).float()
                decision = adaptive.step()  # before optimizer.step(): it sets this step's LR
                optimizer_step(optimizer, scaler)
                loss_steps += 1
                if decision is not None:
                    decisions.append({"step": adaptive.steps,
                                      "examples_seen": adaptive.examples_seen,
                                      "noise_scale": decision.noise_scale,
                                      "optimum": decision.optimum,
                                      "batch_size": decision.batch_size,
                                      "reason": decision.reason})
            devices.synchronize(device)
            train_seconds += time.perf_counter() - clock
            record.steps_done = record.total_steps = adaptive.steps
            record.samples_seen, record.train_seconds = adaptive.examples_seen, train_seconds
            record.extra["epoch_end_batch_sizes"].append(adaptive.batch_size)
            point = evaluate_into(record, workload, model, device, loss_sum, loss_steps,
                                  index=epoch + 1, epoch=float(epoch + 1), step=adaptive.steps)
            if point is None:
                return
            loss_steps = 0
            if on_eval is not None:
                on_eval(point, record)  # progress only: a benchmark run is never pruned
                if adaptive.batch_size != shown_batch:
                    shown_batch = adaptive.batch_size
                    tvr.say(f"[adaptive] batch now {shown_batch} (noise scale "
                            f"{_num(adaptive.noise_scale)})")
    finally:
        record.extra.update(final_batch_size=adaptive.batch_size,
                            examples_seen=adaptive.examples_seen, finished=adaptive.finished,
                            noise_scale=adaptive.noise_scale)
        adaptive.close()
        if out_dir is not None:
            save_adaptive_run(adaptive, out_dir, workload=workload, device=device)


# -- summary and output -------------------------------------------------------------------------


def first_reach(record: TrialRecord, target: float) -> tuple[float | None, float | None]:
    """(training seconds, epochs) of the first evaluation at or above `target`."""
    for point in record.curve:
        if point.metric >= target:
            return point.train_seconds, point.epoch
    return None, None


def summarise_runs(runs: dict[str, TrialRecord], tune_seconds: float, tolerance_points: float,
                   reference_metric: float | None) -> dict[str, Any]:
    fixed, adaptive = runs["fixed"], runs["adaptive"]
    summary: dict[str, Any] = {"tune_seconds": tune_seconds,
                               "adaptive_changes": adaptive.extra.get("changes", [])}
    if fixed.final_metric is None or fixed.outcome != "complete":
        summary["verdict"] = f"no target: the fixed run ended '{fixed.outcome}'"
        return summary
    target = fixed.final_metric - tolerance_points / 100.0
    for record in runs.values():
        apply_target(record, target, higher_is_better=True)
    ratio = (fixed.time_to_target / adaptive.time_to_target
             if fixed.time_to_target and adaptive.time_to_target else None)
    summary.update({
        "target_metric": target,
        "fixed_final_metric": fixed.final_metric,
        "adaptive_final_metric": adaptive.final_metric,
        "final_metric_difference_points": None if adaptive.final_metric is None else
        100.0 * (adaptive.final_metric - fixed.final_metric),
        "fixed_time_to_target": fixed.time_to_target,
        "adaptive_time_to_target": adaptive.time_to_target,
        "fixed_train_seconds": fixed.train_seconds,
        "adaptive_train_seconds": adaptive.train_seconds,
        "ratio_fixed_over_adaptive_time_to_target": ratio,
    })
    if ratio is None:
        summary["verdict"] = (f"the adaptive run never reached {target:.2%} (outcome "
                              f"'{adaptive.outcome}', final {_pct(adaptive.final_metric)})")
    else:
        summary["verdict"] = (f"to {target:.2%}: fixed {fixed.time_to_target:.1f} s, adaptive "
                              f"{adaptive.time_to_target:.1f} s: fixed / adaptive = {ratio:.2f}x")
    reference = runs.get("reference")
    anchor = (reference.final_metric if reference is not None and reference.outcome == "complete"
              else reference_metric)
    if anchor is not None:
        summary["reference_style"] = reference_style(runs, anchor, tolerance_points, tune_seconds,
                                                     measured=reference is not None)
    return summary


def reference_style(runs: dict[str, TrialRecord], reference_final: float,
                    tolerance_points: float, tune_seconds: float, measured: bool) -> dict[str, Any]:
    """Times to tune_vs_reference's target (the reference's final accuracy minus the
    tolerance); with a measured reference run, its speed-up bar with tuning included too."""
    target = reference_final - tolerance_points / 100.0
    style: dict[str, Any] = {"target_metric": target, "reference_final_metric": reference_final,
                             "reference_measured_here": measured}
    reference_time = None
    if "reference" in runs:
        reference_time = first_reach(runs["reference"], target)[0]
        style["reference_time_to_target"] = reference_time
    for label in ("fixed", "adaptive"):
        seconds, epochs = first_reach(runs[label], target)
        style[f"{label}_time_to_target"] = seconds
        style[f"{label}_epochs_to_target"] = epochs
        with_tuning = None if seconds is None else tune_seconds + seconds
        style[f"{label}_time_to_target_with_tuning"] = with_tuning
        style[f"{label}_speedup_tuning_included"] = (
            reference_time / with_tuning if reference_time and with_tuning else None)
    return style


def print_table(runs: dict[str, TrialRecord], summary: dict[str, Any], workload: Workload,
                device: torch.device, smoke: bool) -> None:
    labels = list(runs)
    adaptive = runs["adaptive"]

    def row(name: str, value: Callable[[TrialRecord], Any]) -> tuple[str, list[str]]:
        return name, [str(value(runs[label])) for label in labels]

    batch_sizes = sorted({adaptive.batch_size, *(c["batch_size"] for c in
                                                   adaptive.extra.get("changes", []))})
    rows = [
        row("batch size", lambda r: r.batch_size if r is not adaptive else
            " -> ".join(str(b) for b in batch_sizes)),
        row("peak LR (at start batch)", lambda r: f"{r.learning_rate:.4g}"),
        row("warmup steps", lambda r: r.warmup_steps),
        row("optimizer steps", lambda r: r.steps_done),
        row("examples seen", lambda r: r.samples_seen),
        row("outcome", lambda r: r.outcome),
        row("final accuracy", lambda r: _pct(r.final_metric)),
        row("best accuracy", lambda r: _pct(r.best_metric)),
        row("training s", lambda r: f"{r.train_seconds:.1f}"),
        row("wall s (with evals)", lambda r: f"{r.wall_seconds:.1f}"),
        row("samples/s", lambda r: _num(r.samples_per_second)),
        row("training s to target", lambda r: _num(r.time_to_target)),
        row("epochs to target", lambda r: _num(r.epochs_to_target)),
    ]
    print(f"\n== {workload.name} on {devices.device_name(device)}: adaptive batch size vs tune's "
          f"fixed recommendation ==")
    if smoke:
        print(SMOKE_NOTE)
    print(f"tune: {summary['tune_seconds']:.1f} s")
    if "target_metric" in summary:
        below = 100 * (summary["fixed_final_metric"] - summary["target_metric"])
        print(f"target: fixed run's final accuracy - {below:.1f} points = "
              f"{summary['target_metric']:.2%}")
    print(f"{'':<26}" + "".join(f"{label:>18}" for label in labels))
    for name, values in rows:
        print(f"{name:<26}" + "".join(f"{value:>18}" for value in values))
    changes = adaptive.extra.get("changes", [])
    print(f"\nadaptive batch changes ({len(changes)}; data: {adaptive.extra.get('data', '-')}):")
    if changes:
        print(f"{'step':>8} {'examples':>10} {'batch':>14} {'noise scale':>12} {'pred. gain':>11}")
        for change in changes:
            print(f"{change['step']:>8} {change['examples_seen']:>10} "
                  f"{change['previous']:>6} -> {change['batch_size']:<5} "
                  f"{_num(change['noise_scale']):>12} {change['predicted_gain']:>10.1%}")
    decisions = adaptive.extra.get("decisions", [])
    if decisions:
        print(f"last of {len(decisions)} decisions: {decisions[-1]['reason']}")
    else:
        print("no decision was taken (too few measured steps for the controller's settings)")
    print(f"\n{summary['verdict']}")
    style = summary.get("reference_style")
    if style is not None:
        where = "measured here" if style["reference_measured_here"] else "given"
        print(f"\nreference-style target: reference final {_pct(style['reference_final_metric'])} "
              f"({where}) - {100 * (style['reference_final_metric'] - style['target_metric']):.1f} "
              f"points = {style['target_metric']:.2%}")
        if "reference_time_to_target" in style:
            print(f"  reference: {_num(style['reference_time_to_target'])} s to it")
        for label in ("fixed", "adaptive"):
            speedup = style[f"{label}_speedup_tuning_included"]
            print(f"  {label}: {_num(style[f'{label}_time_to_target'])} s training "
                  f"({_num(style[f'{label}_time_to_target_with_tuning'])} s with tuning)"
                  + (f", {speedup:.2f}x sooner than the reference (bar {tvr.SPEEDUP_BAR:g}x)"
                     if speedup is not None else ""))



if __name__ == "__main__":
    sys.exit(main())
