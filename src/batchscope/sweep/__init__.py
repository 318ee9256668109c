"""Sweeps: short real training trials over batch sizes (Optuna embedded, Ray Tune distributed).

    result = batchscope.sweep.sweep("small-cnn-cifar10", [32, 64, 128], lr_rule="all", epochs=2)
    result.front          # keys of the Pareto-optimal trials (time-to-target vs final metric)
    result.table()        # one row per trial
"""

from batchscope.sweep.api import DEFAULT_OUT_DIR, sweep
from batchscope.sweep.grid import GridPoint, SearchSpace, expand_lr_rules, parse_batch_sizes
from batchscope.sweep.results import SweepResult, SweepTrialsFailed, TrialFailure, pareto_front
from batchscope.sweep.schedule import LrSchedule, plan_schedule
from batchscope.sweep.trial import run_trial
from batchscope.sweep.trial_record import EvalPoint, TrialRecord, TrialSettings

__all__ = [
    "DEFAULT_OUT_DIR",
    "EvalPoint",
    "GridPoint",
    "LrSchedule",
    "SearchSpace",
    "SweepResult",
    "SweepTrialsFailed",
    "TrialFailure",
    "TrialRecord",
    "TrialSettings",
    "expand_lr_rules",
    "pareto_front",
    "parse_batch_sizes",
    "plan_schedule",
    "run_trial",
    "sweep",
]
