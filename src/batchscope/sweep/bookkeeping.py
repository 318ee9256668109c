"""Who runs which sweep point: ownership, heartbeats, stale trials and duplicate claims.

Optuna's own heartbeat exists only for RDB storages and only inside `study.optimize`; a sweep
also runs on a journal file and drives trials itself, so it keeps its own books in each trial's
system attributes:

- `batchscope:owner`  - the worker running the trial (host, PID namespace, PID, start time);
- `batchscope:heartbeat` - unix time, refreshed every `interval` seconds while it runs;
- `batchscope:outcome` - how the trial ended (see FINISHED_OUTCOMES / RETRY_OUTCOMES).

A RUNNING trial is *stale* when its owner is on this machine and that process is gone (checked
at once, by PID and start time), or, for an owner elsewhere, when its heartbeat is older than
the grace period. Stale trials are failed and their point is queued again.

Claiming a point is made exactly-once without locks: a worker that pops a queued trial first
marks it RUNNING (an atomic WAITING->RUNNING transition in both storages), then looks at the
other trials of the same point; if any of them is finished or RUNNING on a live worker, it gives
its own trial up as a duplicate. Of two workers that claim the same point at the same moment, at
least one sees the other (each writes before it reads), so at most one trains; if both give up,
the point is simply queued again by the next reconciliation.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import psutil
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from batchscope.sweep.trial_record import OUTCOMES

OWNER = "batchscope:owner"
HEARTBEAT = "batchscope:heartbeat"
OUTCOME = "batchscope:outcome"
KEY = "batchscope.key"
POINT = "batchscope.point"
RECORD = "batchscope.record"

FINISHED_OUTCOMES = OUTCOMES
"""A point with a trial that ended like this is done: it is never run again."""
RETRY_OUTCOMES = ("stale", "error", "interrupted")
"""A trial that ended like this measured nothing usable; its point is queued again."""
DUPLICATE = "duplicate"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    host: str
    pid_namespace: str
    pid: int
    started: float

    @classmethod
    def current(cls) -> "Owner":
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:  # not Linux: the host name alone identifies the machine
            namespace = ""
        return cls(socket.gethostname(), namespace, os.getpid(), psutil.Process().create_time())

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid_namespace": self.pid_namespace,
            "pid": self.pid,
            "started": self.started,
        }

    def same_machine(self, other: dict[str, Any]) -> bool:
        return other.get("host") == self.host and other.get("pid_namespace") == self.pid_namespace


def process_alive(pid: int, started: float) -> bool:
    """Whether process `pid` exists and is the one that started at `started` (not a reuse)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


@dataclass(frozen=True)
class Liveness:
    """Decides whether a RUNNING trial still has a live worker."""

    me: Owner
    grace_seconds: float

    def is_stale(self, trial: FrozenTrial, now: float | None = None) -> bool:
        if trial.state != TrialState.RUNNING:
            return False
        now = time.time() if now is None else now
        owner = trial.system_attrs.get(OWNER)
        if isinstance(owner, dict) and self.me.same_machine(owner):
            if int(owner.get("pid", -1)) == self.me.pid and owner.get("started") == self.me.started:
                return False  # this very process: it knows what it runs
            return not process_alive(int(owner.get("pid", -1)), float(owner.get("started", 0.0)))
        beat = trial.system_attrs.get(HEARTBEAT)
        if not isinstance(beat, (int, float)):
            # Killed between claiming and writing its owner: fall back on the start time.
            start = trial.datetime_start
            beat = start.timestamp() if start is not None else now
        return now - float(beat) > self.grace_seconds


def trial_key(trial: FrozenTrial) -> str | None:
    key = trial.user_attrs.get(KEY)
    return key if isinstance(key, str) else None


def outcome_of(trial: FrozenTrial) -> str | None:
    outcome = trial.system_attrs.get(OUTCOME)
    return outcome if isinstance(outcome, str) else None


def is_finished(trial: FrozenTrial) -> bool:
    """Done for good: a result that will be reported and never re-run."""
    return trial.state.is_finished() and outcome_of(trial) in FINISHED_OUTCOMES


def point_status(trials: Iterable[FrozenTrial], liveness: Liveness) -> dict[str, str]:
    """key -> "finished" | "pending" (queued or running on a live worker); keys with neither
    are absent (they need queueing)."""
    status: dict[str, str] = {}
    for trial in trials:
        key = trial_key(trial)
        if key is None:
            continue
        if is_finished(trial):
            status[key] = "finished"
        elif status.get(key) != "finished" and (
            trial.state == TrialState.WAITING
            or (trial.state == TrialState.RUNNING and not liveness.is_stale(trial))
        ):
            status[key] = "pending"
    return status


def is_duplicate_claim(
    mine: FrozenTrial, trials: Iterable[FrozenTrial], liveness: Liveness
) -> bool:
    """Whether another trial of my point is finished or running on a live worker."""
    key = trial_key(mine)
    for other in trials:
        if other.number == mine.number or trial_key(other) != key:
            continue
        if is_finished(other):
            return True
        if other.state == TrialState.RUNNING and not liveness.is_stale(other):
            return True
    return False


class Heartbeat:
    """Writes the owner once and the heartbeat every `interval` seconds while a trial runs."""

    def __init__(self, storage: BaseStorage, trial_id: int, owner: Owner, interval: float):
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        storage.set_trial_system_attr(trial_id, OWNER, owner.to_dict())
        storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        self._thread = threading.Thread(target=self._beat, name="batchscope-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.set_trial_system_attr(self._trial_id, HEARTBEAT, time.time())
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the trial;
                # a worker that cannot reach storage for a whole grace period is stale anyway.
                logger.debug("heartbeat of trial %s not written: %r", self._trial_id, exc)
