"""RunRecord: the versioned JSON document every batchscope command writes.

One record per run: what was measured (a section per probe, the recommendation, sweep trials),
on what (environment), for which workload. Reports are rendered from records alone, so any saved
run can be re-rendered later. Records are plain JSON (never pickle) and written atomically: a
crash mid-write leaves the previous file intact, never a truncated one.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchscope.atomic import write_text_atomic
from batchscope.errors import UsageError

# `write_text_atomic` is re-exported: callers import it from here (report/, sweep/).
__all__ = [
    "SCHEMA_VERSION",
    "RunRecord",
    "environment_info",
    "to_jsonable",
    "write_json_atomic",
    "write_text_atomic",
]

SCHEMA_VERSION = 1


@dataclass
class RunRecord:
    """A run: its kind (`tune`, `probe-memory`, `sweep`, ...), environment, workload summary,
    and one JSON section per result (`memory`, `throughput`, `noise`, `recommendation`...)."""

    kind: str
    workload: dict[str, Any]
    environment: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    schema_version: int = SCHEMA_VERSION
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "created_at": self.created_at,
            "batchscope_version": _batchscope_version(),
            "environment": self.environment,
            "workload": self.workload,
            "sections": self.sections,
            "errors": self.errors,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UsageError(
                f"run record schema_version={version!r} is not supported (this batchscope reads "
                f"version {SCHEMA_VERSION}); re-run the command with this version"
            )
        return cls(
            kind=str(data["kind"]),
            workload=dict(data.get("workload", {})),
            environment=dict(data.get("environment", {})),
            sections=dict(data.get("sections", {})),
            created_at=str(data.get("created_at", "")),
            errors=list(data.get("errors", [])),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunRecord":
        path = Path(path)
        data = _parse_record_json(path)
        if not isinstance(data, dict) or "kind" not in data:
            raise UsageError(f"{str(path)!r} is not a batchscope run record (no 'kind' key)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:  # e.g. "sections": 5 in a hand-edited record
            raise UsageError(f"run record {str(path)!r} is malformed ({exc}); re-run the command "
                             f"that wrote it") from None


def _parse_record_json(path: Path) -> Any:
    """The JSON in `path`; every way a path can fail to be a readable JSON file is a one-line
    UsageError naming the path (a user passes the wrong path far more often than a broken one)."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"run record {name!r} does not exist; pass a run.json path") from None
    except IsADirectoryError:
        inside = path / "run.json"
        fix = f"pass {str(inside)!r}" if inside.is_file() else "pass a run.json file"
        raise UsageError(f"run record {name!r} is a directory; {fix}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"run record {name!r} is not valid JSON (not UTF-8 text: byte "
                         f"0x{exc.object[exc.start]:02x} at offset {exc.start}); pass a run.json "
                         f"written by batchscope") from None
    except OSError as exc:  # permission denied, a FIFO's error, an I/O error...
        raise UsageError(f"run record {name!r} cannot be read ({exc.strerror or exc}); pass a "
                         f"readable run.json path") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"run record {name!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write `data` as JSON atomically (`batchscope.atomic`): the text is built in full first,
    so data that cannot be serialised leaves the previous file untouched."""
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become None (JSON has no NaN/inf)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy / torch scalars
        return to_jsonable(value.item())
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


def environment_info(device: Any = None) -> dict[str, Any]:
    """Where the run happened: versions, device, memory, CPU count."""
    import torch

    from batchscope import device as devices

    resolved = devices.resolve_device(device) if not isinstance(device, torch.device) else device
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(resolved),
        "device_name": devices.device_name(resolved),
        "total_memory_bytes": devices.total_memory_bytes(resolved),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }
    return info


def _batchscope_version() -> str:
    from batchscope import __version__

    return __version__
