"""`sweep()` end to end on the tiny synthetic workload: outcomes, resume rules, search mode."""

import optuna
import pytest
from optuna.trial import TrialState

from batchscope.errors import UsageError
from batchscope.sweep import bookkeeping as books
from batchscope.sweep import sweep


def _journal(tmp_path, study):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna-journal.log"))
    )
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_diverged_and_oom_trials_are_results_and_not_rerun(tiny, tmp_path):
    # regression, lower mse is better; the Hessian is ~2I, so SGD is stable for lr < 1: B=16
    # trains at 0.4; the linear rule gives B=64 a constant 1.6 after warmup, growing the error
    # 2.2x per step until the loss overflows
    workload = tiny(task="regress", reference_lr=0.4, oom_above=64, dataset_size=4096,
                    schedule="constant")
    kwargs = dict(lr_rule="linear", epochs=1, out_dir=tmp_path, pruning=False, report=False)
    result = sweep(workload, [16, 64, 128], **kwargs)
    outcomes = {t.key: t.outcome for t in result.trials}
    assert outcomes == {"b16-linear": "complete", "b64-linear": "diverged", "b128-linear": "oom"}
    assert result.front == ["b16-linear"]
    assert not result.higher_is_better
    again = sweep(workload, [16, 64, 128], **kwargs)
    assert {t.key: t.outcome for t in again.trials} == outcomes
    assert len(_journal(tmp_path, "tiny-regress-grid")) == 3  # nothing re-run


def test_a_user_error_fails_the_trial_and_the_next_run_retries_it(tiny, tmp_path):
    good = tiny()
    calls = {"n": 0}

    def flaky_loss(model, batch):
        calls["n"] += 1
        raise RuntimeError("disk on fire")

    kwargs = dict(epochs=1, out_dir=tmp_path, pruning=False, report=False)
    with pytest.raises(RuntimeError, match="disk on fire"):
        sweep(good.with_settings(loss=flaky_loss), [16, 32], **kwargs)
    first = _journal(tmp_path, "tiny-classify-grid")
    assert [(books.trial_key(t), t.state, books.outcome_of(t)) for t in first] == [
        ("b16-linear", TrialState.FAIL, "error"), ("b32-linear", TrialState.WAITING, None)
    ]
    result = sweep(good, [16, 32], **kwargs)
    assert [t.key for t in result.trials] == ["b16-linear", "b32-linear"]
    states = [(books.trial_key(t), t.state) for t in _journal(tmp_path, "tiny-classify-grid")]
    assert states.count(("b16-linear", TrialState.COMPLETE)) == 1


def test_ctrl_c_marks_the_trial_interrupted_for_a_rerun(tiny, tmp_path):
    def interrupted(model, batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(tiny().with_settings(loss=interrupted), [16], out_dir=tmp_path, report=False)
    (trial,) = _journal(tmp_path, "tiny-classify-grid")
    assert (trial.state, books.outcome_of(trial)) == (TrialState.FAIL, "interrupted")


def test_search_mode_finishes_n_trials_inside_the_ranges(tiny, tmp_path):
    result = sweep(tiny(), [8, 64], mode="search", n_trials=3, epochs=1, out_dir=tmp_path,
                   pruning=False, report=False)
    assert len(result.trials) == 3
    for trial in result.trials:
        assert trial.lr_rule == "search" and 8 <= trial.batch_size <= 64
        assert 0.5 * 8 / 16 / 4 <= trial.learning_rate <= 0.5 * 64 / 16 * 2
        assert trial.outcome == "complete"
    assert result.config["search_space"] == {
        "min_batch_size": 8, "max_batch_size": 64, "min_lr": 0.0625, "max_lr": 4.0}


def test_resuming_with_other_settings_is_refused(tiny, tmp_path):
    sweep(tiny(), [16], epochs=1, out_dir=tmp_path, report=False)
    with pytest.raises(UsageError, match="different settings \\(epochs\\)"):
        sweep(tiny(), [16], epochs=2, out_dir=tmp_path, report=False)
    # a new study name in the same directory is fine
    assert sweep(tiny(), [16], epochs=2, out_dir=tmp_path, study_name="two", report=False).trials


def test_a_workload_without_evaluation_is_refused(tiny, tmp_path):
    with pytest.raises(UsageError, match="lacks evaluate"):
        sweep(tiny().with_settings(evaluate=None), [16], out_dir=tmp_path)
