"""End to end: does `batchscope.tune`'s recommendation reach the reference's accuracy sooner,
counting the time spent tuning?

    PYTHONPATH=src python benchmarks/tune_vs_reference.py --out runs/tune-vs-ref.json   # CUDA
    PYTHONPATH=src python benchmarks/tune_vs_reference.py --cpu-smoke                    # harness

On a GPU, all in this one process, for the seed workload (ResNet-18 / CIFAR-10):

1. `batchscope.tune(...)` with --budget seconds, its wall clock timed;
2. a fresh model trained for --epochs epochs at the recommendation: its batch size, peak LR and
   warmup, then the workload's cosine schedule over the remaining steps;
3. a fresh model trained for --epochs epochs at the reference (batch 128, LR 0.1, no warmup,
   the same cosine shape).

Both runs go through the sweep's trial runner (`batchscope.sweep.trial.run_trial`): the same
seed, data order per epoch, on-device augmentation and evaluation on the full test set after
every epoch (--evals-per-epoch). Times on the curves are *training* seconds: the clock stops
while the model is evaluated, because evaluation is this benchmark's cost, not the method's;
each run's wall clock (evaluations and its one untimed burn-in step included) is reported too.

Target: the reference's final accuracy minus --tolerance (0.5 points). Printed side by side:
final and best accuracy, training and wall seconds, samples/s, and when each run first reached
the target. The issue's bar: the recommendation reaches the target at least 2.5x sooner than the
reference does, tuning time included: reference time to target / (tuning + recommended time to
target) >= 2.5. The ratio against the reference's whole run is printed too. --out writes everything as JSON, rewritten
after each stage so that a run cut short keeps what it measured.

Before anything is timed, one untimed training step at the reference batch pays the process's
one-time costs (decoding the dataset, CUDA context, cuDNN handles), so tuning is not charged
for them.

--cpu-smoke runs the same code on the CPU with the small CNN on a 1,024-image subset, 1 epoch
and a 20 s tune budget. It exercises the harness; its numbers mean nothing about the bar.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchscope import device as devices
from batchscope import scaling
from batchscope.record import environment_info, write_json_atomic
from batchscope.recommend import Recommendation
from batchscope.step import build_model, train_step
from batchscope.sweep.grid import GridPoint
from batchscope.sweep.trial import run_trial
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings, apply_target
from batchscope.tuning import tune
from batchscope.workload import Workload
from batchscope.workloads import get_workload

TOLERANCE_POINTS = 0.5


@dataclass(frozen=True)
class Setup:
    workload: str
    options: dict[str, Any]
    epochs: int
    budget_s: float
    device: str


GPU = Setup("resnet18-cifar10", {}, epochs=30, budget_s=120.0, device="cuda")
SMOKE = Setup("small-cnn-cifar10", {"train_size": 1024, "test_size": 256}, epochs=1,
              budget_s=20.0, device="cpu")


# The tune issue: the recommendation reaches the target at least 2.5x sooner, tuning included.
SPEEDUP_BAR = 2.5

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals-per-epoch", type=int, default=1,
                        help="test-set evaluations per epoch (the time-to-target resolution)")
    parser.add_argument("--also-lr-rule", default=None,
                        help="also train tune's plan under this LR rule (e.g. adascale): same "
                             "batch, the rule's LR and warmup, scored against the same reference")
    add_tune_and_train_arguments(parser, GPU, SMOKE, target_of="the reference's",
                                 smoke_help="small-cnn-cifar10 on the CPU, 1 epoch, 20 s budget")
    args = parser.parse_args(argv)

    setup = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not cuda_or_say("tune_vs_reference"):
        return 2
    epochs = args.epochs if args.epochs is not None else setup.epochs
    budget = args.budget if args.budget is not None else setup.budget_s
    if epochs <= 0 or args.evals_per_epoch <= 0:
        parser.error("--epochs and --evals-per-epoch must be positive integers")
    if args.also_lr_rule is not None and args.also_lr_rule.strip().lower() not in scaling.RULES:
        parser.error(f"--also-lr-rule {args.also_lr_rule!r} is not one of "
                     f"{', '.join(scaling.RULES)}")
    device = devices.resolve_device(args.device or setup.device)
    options = dict(setup.options)
    if args.bf16:
        options.update(autocast="bf16", channels_last=True)
    workload = get_workload(setup.workload, **options)

    results: dict[str, Any] = {
        "benchmark": "tune_vs_reference",
        "environment": environment_info(device),
        "workload": workload.describe(),
        "settings": {"epochs": epochs, "budget_s": budget, "evals_per_epoch":
                     args.evals_per_epoch, "tolerance_points": args.tolerance,
                     "seed": args.seed, "bf16": args.bf16, "cpu_smoke": args.cpu_smoke},
    }
    save = saver(args.out, results)

    pay_one_time_costs(workload, device)
    tuned, tune_seconds = run_tune(workload, device, budget, args.tune_out)
    recommendation = tuned.recommendation
    results["tune"] = {"wall_seconds": tune_seconds,
                       "recommendation": recommendation.to_dict(), "record": tuned.to_dict()}
    save()
    say(f"tune: {tune_seconds:.1f} s -> batch {recommendation.batch_size}, LR "
         f"{recommendation.learning_rate:.4g}, warmup {recommendation.warmup_steps} steps, "
         f"accumulation {recommendation.grad_accumulation}")

    plans = run_plans(workload, recommendation, epochs, args.evals_per_epoch, args.seed)
    alternative = None
    if args.also_lr_rule:
        alternative = tuned.with_lr_rule(args.also_lr_rule)
        if (alternative.learning_rate, alternative.warmup_steps) == (
                recommendation.learning_rate, recommendation.warmup_steps):
            say(f"also: rule {args.also_lr_rule} gives the recommendation's own LR and warmup "
                 f"({alternative.lr_rule}); nothing more to train")
            alternative = None
    if alternative is not None:
        label = f"recommended-{alternative.lr_rule}"
        _, point, settings = run_plans(workload, alternative, epochs, args.evals_per_epoch,
                                        args.seed)[0]
        plans.append((label, point, settings))  # after the reference: a timeout keeps the pair
        results["alternative"] = {"label": label, "recommendation": alternative.to_dict()}
        say(f"also: {alternative.lr_rule} rule -> LR {alternative.learning_rate:.4g}, warmup "
             f"{alternative.warmup_steps} steps")
    runs: dict[str, TrialRecord] = {}
    results["runs"] = {}
    for label, point, settings in plans:
        devices.release_memory(device)
        runs[label] = run_trial(workload, point, settings, device,
                                on_eval=progress(label, epochs))
        results["runs"][label] = runs[label].to_dict()
        save()

    summary = summarise(runs["recommended"], runs["reference"], recommendation, tune_seconds,
                         args.tolerance)
    results["summary"] = summary
    if alternative is not None:
        label = results["alternative"]["label"]
        results["alternative"]["summary"] = summarise(
            runs[label], runs["reference"], alternative, tune_seconds, args.tolerance)
    results["runs"] = {label: record.to_dict() for label, record in runs.items()}
    save()
    print_table(runs, summary, workload, device)
    if alternative is not None:
        alt = results["alternative"]
        print(f"\n{alt['label']} (LR {alternative.learning_rate:.4g}, warmup "
              f"{alternative.warmup_steps} steps, final "
              f"{_pct(runs[alt['label']].final_metric)}): {alt['summary']['verdict']}")
    if args.out is not None:
        print(f"\nwritten: {args.out}")
    return 0


# -- stages -------------------------------------------------------------------------------------


def add_tune_and_train_arguments(parser: argparse.ArgumentParser, gpu: Any, smoke: Any, *,
                                 target_of: str, smoke_help: str) -> None:
    """The flags every tune-then-train benchmark shares (this one and adaptive_vs_fixed.py)."""
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs of each run (default {gpu.epochs}; smoke "
                             f"{smoke.epochs})")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"tune's time budget in seconds (default {gpu.budget_s:g}; smoke "
                             f"{smoke.budget_s:g})")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE_POINTS,
                        help=f"accuracy points below {target_of} final accuracy that count as "
                             "reaching it (default 0.5)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast + channels_last for tuning and every run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default cuda; smoke cpu)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--tune-out", type=Path, default=None,
                        help="directory for tune's run.json and report.html")
    parser.add_argument("--cpu-smoke", action="store_true", help=smoke_help)


def cuda_or_say(script: str) -> bool:
    """True on a CUDA machine; otherwise the one-line message every GPU benchmark gives."""
    if torch.cuda.is_available():
        return True
    print(f"benchmarks/{script}.py needs a CUDA GPU (none is visible); to exercise the harness "
          "on the CPU use --cpu-smoke", file=sys.stderr)
    return False


def pay_one_time_costs(workload: Workload, device: torch.device) -> None:
    """One untimed step at the reference batch on a throwaway model: dataset decoding, the
    CUDA context and cuDNN handles are the process's costs, not tuning's."""
    model = build_model(workload, device)
    optimizer = workload.build_optimizer(model.parameters(), workload.reference_lr)
    generator = torch.Generator().manual_seed(0)
    batch = workload.make_batch(workload.reference_batch_size, device, generator)
    train_step(workload, model, optimizer, batch, device)
    if workload.evaluate is not None:
        workload.evaluate(model, device)  # puts the test split on the device too
    devices.synchronize(device)
    del model, optimizer, batch
    devices.release_memory(device)


def run_tune(workload: Workload, device: torch.device, budget: float,
              out_dir: Path | None) -> tuple[Any, float]:
    started = time.perf_counter()
    result = tune(workload, device=device, budget_s=budget, out_dir=out_dir,
                  progress=lambda message: say(f"tune: {message}"))
    devices.synchronize(device)
    seconds = time.perf_counter() - started
    devices.release_memory(device)
    return result, seconds


def run_plans(workload: Workload, recommendation: Recommendation, epochs: int,
               evals_per_epoch: int, seed: int) -> list[tuple[str, GridPoint, TrialSettings]]:
    """(label, point, settings) of both runs; the recommended one first."""
    steps_per_epoch = (workload.dataset_size or 0) // recommendation.batch_size
    # plan_schedule's rule warmup is ceil(epochs * steps_per_epoch) when the LR rises more
    # than 2x, else none; half a step below the recommendation's count makes the ceiling land
    # exactly on it, free of float rounding.
    warmup_epochs = (max(0.0, recommendation.warmup_steps - 0.5) / steps_per_epoch
                     if steps_per_epoch > 0 else 0.0)
    recommended = GridPoint(recommendation.batch_size, recommendation.lr_rule,
                            learning_rate=recommendation.learning_rate)
    # Accumulated as recommended when the batch does not fit in one pass.
    micro = (recommendation.per_device_batch_size if recommendation.grad_accumulation > 1
             else None)
    reference = GridPoint(workload.reference_batch_size, "none",
                          learning_rate=workload.reference_lr)
    return [
        ("recommended", recommended,
         TrialSettings(epochs, evals_per_epoch, seed, rule_warmup_epochs=warmup_epochs,
                       max_micro_batch_size=micro)),
        ("reference", reference,
         TrialSettings(epochs, evals_per_epoch, seed, rule_warmup_epochs=0.0)),
    ]


def summarise(recommended: TrialRecord, reference: TrialRecord,
               recommendation: Recommendation, tune_seconds: float,
               tolerance_points: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "tune_seconds": tune_seconds,
        "recommended_warmup_steps_planned": recommendation.warmup_steps,
        "recommended_warmup_steps_trained": recommended.warmup_steps,
    }
    if reference.final_metric is None or reference.outcome != "complete":
        summary["verdict"] = f"no target: the reference run ended '{reference.outcome}'"
        return summary
    target = reference.final_metric - tolerance_points / 100.0
    for record in (recommended, reference):
        apply_target(record, target, higher_is_better=True)
    reference_total = reference.train_seconds
    summary.update({
        "target_metric": target,
        "reference_final_metric": reference.final_metric,
        "recommended_final_metric": recommended.final_metric,
        "final_metric_difference_points": None if recommended.final_metric is None else
        100.0 * (recommended.final_metric - reference.final_metric),
        "reference_train_seconds": reference_total,
        "recommended_train_seconds": recommended.train_seconds,
        "recommended_time_to_target": recommended.time_to_target,
        "reference_time_to_target": reference.time_to_target,
    })
    if recommended.time_to_target is None:
        summary["tuned_time_to_target"] = None
        summary["ratio_vs_reference_total"] = None
        summary["meets_bar"] = False
        summary["verdict"] = (f"the recommended run never reached {target:.2%} "
                              f"(outcome '{recommended.outcome}')")
        return summary
    tuned_total = tune_seconds + recommended.time_to_target
    ratio = tuned_total / reference_total if reference_total > 0 else None
    # The reference's own time to the target (its final accuracy minus the tolerance).
    reference_to_target = reference.time_to_target or reference_total
    speedup = reference_to_target / tuned_total if tuned_total > 0 else None
    summary.update({
        "tuned_time_to_target": tuned_total,
        "ratio_vs_reference_total": ratio,
        "ratio_without_tuning": recommended.time_to_target / reference_total
        if reference_total > 0 else None,
        "speedup_to_target_tuning_included": speedup,
        "meets_bar": speedup is not None and speedup >= SPEEDUP_BAR,
    })
    summary["verdict"] = (f"tune + recommended run reach {target:.2%} in {tuned_total:.1f} s; the "
                          f"reference needs {reference_to_target:.1f} s: {speedup:.2f}x sooner "
                          f"(bar {SPEEDUP_BAR:g}x)")
    return summary


# -- output -------------------------------------------------------------------------------------


def saver(path: Path | None, results: dict[str, Any]) -> Any:
    def save() -> None:
        if path is not None:
            write_json_atomic(path, results)
    return save


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(label: str, epochs: int) -> Any:
    def on_eval(point: EvalPoint, record: TrialRecord) -> bool:
        loss = "-" if point.train_loss is None else f"{point.train_loss:.3f}"
        say(f"[{label} b{record.batch_size}] epoch {point.epoch:g}/{epochs}: accuracy "
             f"{point.metric:.2%}, train loss {loss}, {point.train_seconds:.1f} s training")
        return False
    return on_eval


def print_table(runs: dict[str, TrialRecord], summary: dict[str, Any], workload: Workload,
                 device: torch.device) -> None:
    recommended, reference = runs["recommended"], runs["reference"]
    tune_s = summary["tune_seconds"]
    tuned = summary.get("tuned_time_to_target")
    rows = [
        ("batch size", recommended.batch_size, reference.batch_size),
        ("peak LR", f"{recommended.learning_rate:.4g}", f"{reference.learning_rate:.4g}"),
        ("warmup steps", recommended.warmup_steps, reference.warmup_steps),
        ("steps (per epoch)", f"{recommended.steps_done} ({recommended.steps_per_epoch})",
         f"{reference.steps_done} ({reference.steps_per_epoch})"),
        ("outcome", recommended.outcome, reference.outcome),
        ("final accuracy", _pct(recommended.final_metric), _pct(reference.final_metric)),
        ("best accuracy", _pct(recommended.best_metric), _pct(reference.best_metric)),
        ("training s", f"{recommended.train_seconds:.1f}", f"{reference.train_seconds:.1f}"),
        ("wall s (with evals)", f"{recommended.wall_seconds:.1f}",
         f"{reference.wall_seconds:.1f}"),
        ("samples/s", _num(recommended.samples_per_second), _num(reference.samples_per_second)),
        ("tuning s", f"{tune_s:.1f}", "-"),
        ("training s to target", _num(recommended.time_to_target),
         _num(reference.time_to_target)),
        ("tuning + training s to target", _num(tuned), _num(reference.time_to_target)),
    ]
    print(f"\n== {workload.name} on {devices.device_name(device)}: tune's recommendation vs the "
          f"reference ==")
    target = summary.get("target_metric")
    if target is not None:
        print(f"target: reference final accuracy - {100 * (reference.final_metric - target):.1f} "
              f"points = {target:.2%}")
    print(f"{'':<30} {'recommended':>16} {'reference':>16}")
    for name, mine, theirs in rows:
        print(f"{name:<30} {str(mine):>16} {str(theirs):>16}")
    ratio = summary.get("ratio_vs_reference_total")
    if ratio is not None:
        print(f"ratio (tuning + recommended to target) / reference total training: {ratio:.2f}x "
              f"(without tuning {summary['ratio_without_tuning']:.2f}x)")
        print(f"speed-up to target, tuning included: {summary['speedup_to_target_tuning_included']:.2f}x; "
              f"bar >= {SPEEDUP_BAR:g}x: {'yes' if summary['meets_bar'] else 'NO'}")
    print(summary["verdict"])
    if summary["recommended_warmup_steps_planned"] != summary["recommended_warmup_steps_trained"]:
        print(f"note: the recommendation planned {summary['recommended_warmup_steps_planned']} "
              f"warmup steps; the run trained {summary['recommended_warmup_steps_trained']} "
              f"(the workload's own warmup is longer)")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
