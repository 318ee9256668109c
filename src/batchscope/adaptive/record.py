"""An adaptive run's record: settings, every decision and every change, with its report.

Saved as a `RunRecord` of kind "adaptive", so `batchscope report RUN.json` redraws it like any
other run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchscope.atomic import check_writable_directory
from batchscope.errors import UsageError
from batchscope.record import RunRecord, environment_info
from batchscope.workload import Workload

if TYPE_CHECKING:
    from batchscope.adaptive.controller import AdaptiveBatchSize


def adaptive_record(adaptive: "AdaptiveBatchSize", *, workload: Workload | None = None,
                    device: Any = None) -> RunRecord:
    """The run so far as a record (call it at the end, or at any checkpoint)."""
    record = RunRecord(kind="adaptive", workload=workload.describe() if workload is not None else {},
                       environment=environment_info(device))
    record.sections["settings"] = adaptive.settings()
    record.sections["history"] = [dict(entry) for entry in adaptive.history]
    record.sections["changes"] = [dict(change) for change in adaptive.changes]
    record.sections["summary"] = {
        "steps": adaptive.steps, "examples_seen": adaptive.examples_seen,
        "start_batch_size": adaptive.start_batch_size, "final_batch_size": adaptive.batch_size,
        "noise_scale": adaptive.noise_scale, "finished": adaptive.finished,
        "measured_steps": adaptive.monitor.tracker.samples,
        "skipped_measurements": adaptive.monitor.tracker.skipped,
    }
    return record


def save_adaptive_run(adaptive: "AdaptiveBatchSize", out_dir: str | Path, *,
                      workload: Workload | None = None, device: Any = None) -> Path:
    """Write `run.json` and `report.html` (with its plots) into `out_dir`; returns the report."""
    out = Path(out_dir)
    try:
        check_writable_directory(out)
    except OSError as exc:
        raise UsageError(f"output directory {str(out)!r} is not writable ({exc.strerror}); pass a "
                         "writable directory") from None
    record = adaptive_record(adaptive, workload=workload, device=device)
    record.save(out / "run.json")
    from batchscope.report.adaptive_report import write_adaptive_report

    return write_adaptive_report(record, out)
