"""The plain-JSON trial store the Ray backend resumes from."""

import json

import pytest

from batchscope.errors import UsageError
from batchscope.sweep.trial_record import EvalPoint, TrialRecord
from batchscope.sweep.trial_store import TrialStore


def _record(key="b32-linear", outcome="complete"):
    return TrialRecord(key, 32, "linear", 0.1, 0, 16, 32, 0, outcome=outcome, final_metric=0.5,
                       curve=[EvalPoint(1, 1.0, 16, 512, 2.0, 0.5, 1.5)], extra={"backend": "ray"})


def test_saved_records_load_back_equal_in_key_order(tmp_path):
    store = TrialStore(tmp_path / "records" / "study", "study")
    assert store.load() == []  # nothing saved yet, not even the folder
    store.check_config({"epochs": 2})
    store.save(_record("b64-linear", outcome="pruned"))
    store.save(_record("b32-linear"))
    assert [r.to_dict() for r in store.load()] == [_record().to_dict(),
                                                   _record("b64-linear", "pruned").to_dict()]
    assert json.loads((tmp_path / "records" / "study" / "b32-linear.json").read_text())["key"] == "b32-linear"


def test_a_record_without_a_final_outcome_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="no final outcome"):
        TrialStore(tmp_path, "study").save(_record(outcome="running"))
    assert list(tmp_path.iterdir()) == []


def test_resuming_with_other_settings_is_refused_like_an_optuna_study(tmp_path):
    store = TrialStore(tmp_path, "study")
    store.check_config({"epochs": 2, "seed": 0, "mode": "grid"})
    store.check_config({"epochs": 2, "seed": 0, "mode": "grid"})  # the same: fine
    with pytest.raises(UsageError) as error:
        TrialStore(tmp_path, "study").check_config({"epochs": 3, "seed": 1, "mode": "grid"})
    assert str(error.value) == (
        "study 'study' was run with different settings (epochs, seed); resume it with the same "
        "settings or pass a new --study name"
    )


def test_an_unreadable_record_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "b32-linear.json").write_text("{not json")
    with pytest.raises(UsageError, match="b32-linear.json: .*delete the file to run that trial again"):
        TrialStore(tmp_path, "study").load()


def test_a_setting_added_later_resumes_while_unset_and_is_refused_once_changed(tmp_path):
    # A study stored before `max_micro_batch_size` existed lacks the key: unset now, it resumes.
    TrialStore(tmp_path, "study").check_config({"epochs": 2})
    TrialStore(tmp_path, "study").check_config({"epochs": 2, "max_micro_batch_size": None})
    with pytest.raises(UsageError, match=r"different settings \(max_micro_batch_size\)"):
        TrialStore(tmp_path, "study").check_config({"epochs": 2, "max_micro_batch_size": 64})
