"""The seed experiment in one process: `tune`, the batch-size sweep, and tune's recommendation
against the reference, sharing one dataset decode, one CUDA context and the sweep's trials.

    PYTHONPATH=src python benchmarks/seed_experiment.py --bf16 --out gpu-out/seed.json   # CUDA
    PYTHONPATH=src python benchmarks/seed_experiment.py --cpu-smoke                      # harness

1. One untimed step pays the process's one-time costs (decoding, CUDA context, cuDNN).
2. `batchscope.tune(...)` with --budget seconds, timed: the recommendation (tune issue).
3. `batchscope.sweep(...)` on Optuna (journal file under --work): --batch-sizes x --lr-rules,
   --epochs each, no pruning (every curve runs to the end), one test-set evaluation per epoch,
   tune's batch marked on the plots (sweep issue).
4. The reference run (batch 128, LR 0.1, no warmup, cosine) is the sweep's trial at the
   reference batch: every rule gives the reference LR there, so the sweep trains it once. The
   recommended run is the sweep trial with exactly the recommendation's batch, LR and warmup,
   or else one more run of the same trial runner. Then, as in tune_vs_reference.py: target =
   reference final accuracy - 0.5 points; speed-up = reference time to target / (tuning +
   recommended time to target); bar 2.5x.
5. The sweep is re-scored against that target (time to target per trial, the Pareto front),
   its report re-rendered, and the "empirical best range" printed: the trials that reach the
   target within 10% of the fastest one. Is tune's batch in it?

Training times exclude evaluation (the clock stops while the test set is scored), as in the
sweep; each trial's wall time with evaluations is in the JSON. --out is rewritten after each
stage, so a run cut short keeps what it measured.

Needs optuna (on the device image: `pip install --target` the wheels from
benchmarks/fetch_device_wheels.sh, as gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path (tests)
import tune_vs_reference as tvr  # noqa: E402  (the shared stages and summary)
from batchscope import device as devices  # noqa: E402
from batchscope.cli.sweep_cmd import render
from batchscope.record import environment_info
from batchscope.recommend import Recommendation
from batchscope.sweep.api import sweep
from batchscope.sweep.grid import expand_lr_rules, parse_batch_sizes
from batchscope.sweep.output import write_outputs
from batchscope.sweep.results import SweepResult
from batchscope.sweep.trial import run_trial
from batchscope.sweep.trial_record import TrialRecord
from batchscope.workload import Workload
from batchscope.workloads import get_workload

BEST_RANGE = 0.10
"""Trials within this share of the fastest time to target form the empirical best range."""

GPU_BATCHES = "128,512,1024,2048"
SMOKE_BATCHES = "32,64"  # small-cnn-cifar10 trains at 64 as its reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30)")
    parser.add_argument("--budget", type=float, default=None, help="tune's budget in seconds")
    parser.add_argument("--batch-sizes", default=None, help=f"the sweep (default {GPU_BATCHES})")
    parser.add_argument("--lr-rules", default="linear,sqrt", help="the sweep's LR rules")
    parser.add_argument("--tolerance", type=float, default=tvr.TOLERANCE_POINTS,
                        help="accuracy points below the reference's final accuracy that count "
                             "as reaching it (default 0.5)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast + channels_last for tuning and every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="the results as JSON")
    parser.add_argument("--work", type=Path, default=Path("runs/seed-experiment"),
                        help="tune/ and sweep/ (record, CSV, report, Optuna journal) go here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="small CNN on a CPU subset, 1 epoch: exercises the harness only")
    args = parser.parse_args(argv)

    setup = tvr.SMOKE if args.cpu_smoke else tvr.GPU
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("benchmarks/seed_experiment.py needs a CUDA GPU; use --cpu-smoke on a CPU",
              file=sys.stderr)
        return 2
    epochs = args.epochs if args.epochs is not None else setup.epochs
    budget = args.budget if args.budget is not None else setup.budget_s
    sizes = parse_batch_sizes(args.batch_sizes or (SMOKE_BATCHES if args.cpu_smoke
                                                   else GPU_BATCHES))
    rules = expand_lr_rules([rule.strip() for rule in args.lr_rules.split(",") if rule.strip()])
    if epochs <= 0:
        parser.error(f"--epochs {epochs} must be a positive integer, e.g. 30")
    journal = args.work / "sweep"
    if journal.exists() and any(journal.iterdir()):
        # The sweep would resume the study found there: trials from an older run (another
        # commit, another card) would be compared with a freshly tuned recommendation.
        parser.error(f"--work {args.work} already holds a sweep; pass a new --work or delete it")
    device = devices.resolve_device(args.device or setup.device)
    options = dict(setup.options)
    if args.bf16:
        options.update(autocast="bf16", channels_last=True)
    workload = get_workload(setup.workload, **options)
    if workload.reference_batch_size not in sizes:
        parser.error(f"--batch-sizes must include the reference batch "
                     f"{workload.reference_batch_size}: its trial is the reference run")

    results: dict[str, Any] = {
        "benchmark": "seed_experiment",
        "environment": environment_info(device),
        "workload": workload.describe(),
        "settings": {"epochs": epochs, "budget_s": budget, "batch_sizes": sizes,
                     "lr_rules": rules, "tolerance_points": args.tolerance, "seed": args.seed,
                     "bf16": args.bf16, "cpu_smoke": args.cpu_smoke},
    }
    save = tvr.saver(args.out, results)
    started = time.perf_counter()

    tvr.pay_one_time_costs(workload, device)
    tuned, tune_seconds = tvr.run_tune(workload, device, budget, args.work / "tune")
    recommendation = tuned.recommendation
    results["tune"] = {"wall_seconds": tune_seconds,
                       "recommendation": recommendation.to_dict(), "record": tuned.to_dict()}
    save()
    tvr.say(f"tune: {tune_seconds:.1f} s -> batch {recommendation.batch_size}, LR "
             f"{recommendation.learning_rate:.4g} ({recommendation.lr_rule}), warmup "
             f"{recommendation.warmup_steps} steps, accumulation "
             f"{recommendation.grad_accumulation}")

    swept = sweep(
        setup.workload, sizes, rules, epochs=epochs, device=device,
        out_dir=args.work / "sweep", pruning=False,
        predicted_batch_size=recommendation.batch_size, workload_options=options,
        evals_per_epoch=1, seed=args.seed, progress=tvr.say,
    )
    results["sweep"] = swept.to_dict()
    save()

    reference = _reference_trial(swept, workload)
    recommended = _matching_trial(swept, recommendation)
    if recommended is None:
        tvr.say("the recommendation is not a sweep point: training it with the same runner")
        # run_plans lists the recommended run first, then the reference (which the sweep ran).
        label, point, settings = tvr.run_plans(workload, recommendation, epochs, 1, args.seed)[0]
        devices.release_memory(device)
        recommended = run_trial(workload, point, settings, device,
                                on_eval=tvr.progress(label, epochs))
    results["recommended_run"] = {"from_sweep": recommended.key in {t.key for t in swept.trials},
                                  "record": recommended.to_dict()}
    summary = tvr.summarise(recommended, reference, recommendation, tune_seconds,
                             args.tolerance)
    results["summary"] = summary
    save()

    rescored = _rescore(swept, summary.get("target_metric"), args.work / "sweep", workload,
                        device)
    best_range = _best_range([*rescored.trials, recommended])
    results["sweep_rescored"] = rescored.to_dict()
    results["best_range"] = {"keys": [t.key for t in best_range],
                             "batch_sizes": sorted({t.batch_size for t in best_range}),
                             "recommended_in_range": recommended in best_range}
    results["total_seconds"] = time.perf_counter() - started
    save()

    render(rescored)
    tvr.print_table({"recommended": recommended, "reference": reference}, summary, workload,
                     device)
    _print_best_range(best_range, recommended)
    print(f"\ntotal {results['total_seconds']:.0f} s; files under {args.work}")
    if args.out is not None:
        print(f"written: {args.out}")
    return 0


def _reference_trial(result: SweepResult, workload: Workload) -> TrialRecord:
    """The sweep's trial at the reference batch: the reference LR and no warmup by the rule."""
    for trial in result.trials:
        if (trial.batch_size == workload.reference_batch_size
                and abs(trial.learning_rate - workload.reference_lr) < 1e-12
                and trial.warmup_steps == 0):
            return trial
    raise SystemExit(f"the sweep has no finished trial at the reference batch "
                     f"{workload.reference_batch_size} with LR {workload.reference_lr}")


def _matching_trial(result: SweepResult, recommendation: Recommendation) -> TrialRecord | None:
    """The sweep trial that trained exactly what tune recommends, if any."""
    if recommendation.grad_accumulation != 1:
        return None
    for trial in result.trials:
        if (trial.batch_size == recommendation.batch_size
                and abs(trial.learning_rate - recommendation.learning_rate)
                <= 1e-9 * recommendation.learning_rate
                and trial.warmup_steps == recommendation.warmup_steps):
            return trial
    return None


def _rescore(result: SweepResult, target: float | None, out_dir: Path, workload: Workload,
             device: torch.device) -> SweepResult:
    """The same trials with time to the reference-derived target; files rewritten."""
    if target is None:
        return result
    rescored = SweepResult.build(
        result.trials, higher_is_better=result.higher_is_better, target_metric=target,
        metric_name=result.metric_name, config=result.config,
        predicted_batch_size=result.predicted_batch_size,
    )
    rescored.notes = [*result.notes, f"target {target:.4f} = the reference trial's final "
                      f"{result.metric_name} minus the tolerance (set after the sweep)"]
    write_outputs(rescored, out_dir, workload=workload.describe(),
                  environment=environment_info(device))
    return rescored


def _best_range(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Full-budget trials that reach the target within BEST_RANGE of the fastest (the
    recommended run appears once even when it is also a sweep trial)."""
    unique = list({t.key: t for t in trials}.values())
    reached = [t for t in unique if t.full_budget and t.time_to_target is not None]
    if not reached:
        return []
    fastest = min(t.time_to_target for t in reached)  # type: ignore[type-var]
    return sorted((t for t in reached if t.time_to_target <= (1 + BEST_RANGE) * fastest),  # type: ignore[operator]
                  key=lambda t: t.time_to_target)  # type: ignore[arg-type,return-value]


def _print_best_range(best: list[TrialRecord], recommended: TrialRecord) -> None:
    if not best:
        print("\nempirical best range: no trial reached the target")
        return
    keys = ", ".join(f"{t.key} ({t.time_to_target:.1f} s)" for t in best)
    print(f"\nempirical best range (time to target within {BEST_RANGE:.0%} of the fastest): "
          f"{keys}")
    where = "inside" if any(t.key == recommended.key for t in best) else "outside"
    print(f"tune's recommendation ({recommended.key}, LR {recommended.learning_rate:.4g}, "
          f"warmup {recommended.warmup_steps} steps): {where} that range")


if __name__ == "__main__":
    sys.exit(main())
