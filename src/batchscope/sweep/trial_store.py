"""Finished trials of one study kept as plain JSON files, so a rerun skips them.

The Ray backend's resume: Ray Tune's own restore (`Tuner.restore`) unpickles the experiment
from disk, which batchscope never does. Instead each finished trial's TrialRecord is written
atomically as `<directory>/<key>.json` the moment Ray reports it finished, next to
`config.json`, the settings that make trials comparable. Running the same study again reads
the records back and runs only the points that have none; a trial that failed with an error
wrote nothing, so it runs again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchscope.errors import UsageError
from batchscope.record import to_jsonable, write_json_atomic
from batchscope.sweep.trial_record import OUTCOMES, TrialRecord

CONFIG_NAME = "config.json"


def changed_settings(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The names of the settings that differ between a stored study and this run, sorted."""
    return sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))


def refuse_changed_settings(
    study_name: str, stored: dict[str, Any], expected: dict[str, Any]
) -> None:
    changed = changed_settings(stored, expected)
    if changed:
        raise UsageError(
            f"study {study_name!r} was run with different settings ({', '.join(changed)}); "
            f"resume it with the same settings or pass a new --study name"
        )


class TrialStore:
    """One JSON file per finished trial (named by its point key) and the study's config."""

    def __init__(self, directory: str | Path, study_name: str):
        self.directory = Path(directory)
        self.study_name = study_name

    def check_config(self, config: dict[str, Any]) -> None:
        """Record `config` for a new study; refuse to resume one run with other settings."""
        expected = to_jsonable(config)
        path = self.directory / CONFIG_NAME
        if path.exists():
            refuse_changed_settings(self.study_name, _read_json(path), expected)
            return
        write_json_atomic(path, expected)

    def save(self, record: TrialRecord) -> Path:
        if record.outcome not in OUTCOMES:
            raise ValueError(f"trial {record.key} has no final outcome ({record.outcome!r})")
        return write_json_atomic(self.directory / f"{record.key}.json", record.to_dict())

    def load(self) -> list[TrialRecord]:
        """Every saved trial, in key order."""
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.glob("*.json")):
            if path.name != CONFIG_NAME:
                records.append(TrialRecord.from_dict(_read_json(path)))
        return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot read {path}: {exc}; delete the file to run that trial again"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds no JSON object; delete it to run that trial again")
    return data
