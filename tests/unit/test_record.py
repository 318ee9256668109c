"""RunRecord: versioned JSON, atomic writes, never pickle."""

from __future__ import annotations

import json
import os
import stat

import pytest

from batchscope.errors import UsageError
from batchscope.record import SCHEMA_VERSION, RunRecord, environment_info, write_json_atomic


def _record():
    return RunRecord(kind="tune", workload={"name": "w"}, environment=environment_info("cpu"),
                     sections={"memory": {"max_batch_size": 64, "ratio": float("nan")}})


def test_round_trip_keeps_sections_and_version(tmp_path):
    path = _record().save(tmp_path / "run.json")
    loaded = RunRecord.load(path)
    assert loaded.schema_version == SCHEMA_VERSION
    assert loaded.sections["memory"]["max_batch_size"] == 64
    assert loaded.sections["memory"]["ratio"] is None  # NaN is not JSON; stored as null
    data = json.loads(path.read_text())
    for key in ("torch", "device_name", "total_memory_bytes", "cpu_count"):
        assert key in data["environment"]


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"version": 1})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom while serialising")

    with pytest.raises(RuntimeError, match="boom"):
        write_json_atomic(path, {"bad": Unserialisable()})
    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["run.json"]  # no temp file left behind


def test_other_versions_and_non_records_are_refused(tmp_path):
    path = tmp_path / "old.json"
    data = _record().to_dict()
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="schema_version=99 is not supported"):
        RunRecord.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a batchscope run record"):
        RunRecord.load(path)
    path.write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        RunRecord.load(path)
    with pytest.raises(UsageError, match="does not exist"):
        RunRecord.load(tmp_path / "missing.json")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_saved_record_is_readable_by_others_like_any_file(tmp_path):
    # mkstemp's private 0o600 must not leak into the record: umask 022 -> 0o644.
    previous = os.umask(0o022)
    try:
        path = _record().save(tmp_path / "run.json")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_write_text_atomic_is_still_importable_from_record(tmp_path):
    from batchscope.record import write_text_atomic

    path = write_text_atomic(tmp_path / "trials.csv", "a,b\n1,2\n")
    assert path.read_text() == "a,b\n1,2\n"


def test_a_directory_is_refused_in_one_line_pointing_at_its_run_json(tmp_path):
    with pytest.raises(UsageError) as excinfo:
        RunRecord.load(tmp_path)
    assert str(excinfo.value) == f"run record {str(tmp_path)!r} is a directory; pass a run.json file"
    _record().save(tmp_path / "run.json")
    with pytest.raises(UsageError) as excinfo:
        RunRecord.load(tmp_path)
    assert str(excinfo.value) == (f"run record {str(tmp_path)!r} is a directory; "
                                  f"pass {str(tmp_path / 'run.json')!r}")


def test_bytes_that_are_not_utf8_are_refused_as_not_json(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError) as excinfo:
        RunRecord.load(path)
    assert str(excinfo.value) == (f"run record {str(path)!r} is not valid JSON (not UTF-8 text: "
                                  f"byte 0xff at offset 0); pass a run.json written by batchscope")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused_in_one_line(tmp_path):
    path = _record().save(tmp_path / "run.json")
    path.chmod(0)
    with pytest.raises(UsageError, match=r"cannot be read \(Permission denied\)"):
        RunRecord.load(path)


def test_a_record_with_sections_of_the_wrong_type_is_refused_as_malformed(tmp_path):
    path = tmp_path / "run.json"
    data = _record().to_dict()
    data["sections"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"^run record .* is malformed \(.*\); re-run the command"):
        RunRecord.load(path)
