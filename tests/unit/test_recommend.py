"""The recommendation policy on hand-made plans and evidence (no torch involved)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from batchscope.recommend import Evidence, recommend


@dataclass
class Plan:
    batch_size: int
    micro_batch_size: int
    accumulation: int
    speedup_vs_reference: float = 2.0
    good_range: tuple[int, int] = (512, 2048)
    world_size: int = 1


def _recommend(plan, **evidence):
    fields = dict(memory_limit=2048, noise_scale=4000.0, noise_status="ok", noise_measured_at_step=5000)
    fields.update(evidence)
    return recommend(plan, Evidence(**fields), base_batch_size=128, base_learning_rate=0.1,
                     optimizer_family="sgd", steps_per_epoch=50000 // plan.batch_size)


def test_sgd_linear_rule_with_goyal_warmup():
    rec = _recommend(Plan(1024, 1024, 1))
    assert rec.lr_rule == "linear"
    assert rec.learning_rate == pytest.approx(0.8)
    assert rec.warmup_steps == 5 * (50000 // 1024)  # 8x the LR: five epochs of warmup
    assert rec.predicted_speedup_vs_reference == 2.0
    assert rec.good_range == (512, 2048)
    assert rec.caveats == []


def test_without_a_dataset_size_warmup_is_given_in_epochs_and_says_why():
    rec = recommend(Plan(1024, 1024, 1), Evidence(memory_limit=2048, noise_scale=4000.0,
                                                  noise_status="ok", noise_measured_at_step=5000),
                    base_batch_size=128, base_learning_rate=0.1, optimizer_family="sgd",
                    steps_per_epoch=None)
    assert (rec.warmup_steps, rec.warmup_epochs) == (0, 5.0)
    assert rec.caveats == ["The LR grows 8x: warm it up gradually over ~5 epochs. The workload "
                           "gives no dataset size, so that cannot be counted in steps here (set "
                           "the Workload's dataset_size to get warmup_steps)."]
    assert _recommend(Plan(1024, 1024, 1)).warmup_epochs == 0.0  # in steps when it can be


def test_the_summary_table_shows_warmup_in_epochs_when_steps_are_unknown():
    from batchscope.report.tune_report import summary_rows

    rows = summary_rows({"recommendation": {"batch_size": 1024, "per_device_batch_size": 1024,
                                            "grad_accumulation": 1, "learning_rate": 0.8,
                                            "lr_rule": "linear", "warmup_steps": 0,
                                            "warmup_epochs": 5.0}},
                        {"reference_batch_size": 128, "reference_lr": 0.1})
    assert {"setting": "warmup steps", "reference": 0, "recommended": "~5 epochs"} in rows


def test_adam_family_gets_the_square_root_rule():
    rec = recommend(Plan(512, 512, 1), Evidence(memory_limit=2048), base_batch_size=128,
                    base_learning_rate=1e-3, optimizer_family="adam")
    assert rec.lr_rule == "sqrt"
    assert rec.learning_rate == pytest.approx(2e-3)
    assert any("Noise scale not usable" in line for line in rec.rationale)


def test_adascale_rule_uses_the_measured_noise_scale():
    # gain = S (B_noise + B0) / (B_noise + B) = 8 * (896 + 128) / (896 + 1024) = 8 * 1024 / 1920
    rec = recommend(Plan(1024, 1024, 1), Evidence(memory_limit=2048, noise_scale=896.0,
                                                  noise_status="ok"),
                    base_batch_size=128, base_learning_rate=0.1, optimizer_family="sgd",
                    steps_per_epoch=48, lr_rule="adascale")
    assert rec.lr_rule == "adascale"
    assert rec.learning_rate == pytest.approx(0.1 * 8 * 1024 / 1920)
    assert rec.warmup_steps == 5 * 48  # gain 4.27 > 2: gradual warmup


def test_adascale_without_a_noise_scale_falls_back_to_the_family_rule():
    rec = recommend(Plan(1024, 1024, 1), Evidence(memory_limit=2048), base_batch_size=128,
                    base_learning_rate=0.1, optimizer_family="sgd", lr_rule="adascale")
    assert rec.lr_rule == "linear" and rec.learning_rate == pytest.approx(0.8)
    assert any("'adascale' needs a usable noise scale" in c for c in rec.caveats)


def test_accumulation_plan_and_batchnorm_caveats():
    rec = _recommend(Plan(4096, 16, 256), has_batchnorm=True)
    assert (rec.grad_accumulation, rec.per_device_batch_size) == (256, 16)
    assert any("BatchNorm sees only 16 examples" in c for c in rec.caveats)
    assert any("4096 does not fit at once: 256 accumulation steps of 16" in r for r in rec.rationale)


def test_early_noise_ddp_and_pipeline_caveats():
    rec = recommend(
        Plan(1024, 128, 2, world_size=4),
        Evidence(memory_limit=2048, noise_scale=900.0, noise_status="ok", noise_measured_at_step=40,
                 input_pipeline={"bottleneck": True, "note": "loader gives 10k/s vs 40k/s"}),
        base_batch_size=128, base_learning_rate=0.1, optimizer_family="sgd")
    assert (rec.per_device_batch_size, rec.grad_accumulation, rec.world_size) == (128, 2, 4)
    assert rec.learning_rate == pytest.approx(0.8)  # the global batch's: 1024 / 128 * 0.1
    text = " ".join(rec.caveats)
    assert "measured after 40 training steps" in text
    assert "batchscope.AdaptiveBatchSize.from_tune" in text  # says how to follow it
    assert "global across 4 data-parallel devices: each device runs 2 accumulated micro-batches of 128" in text
    assert "leaves out the gradient all-reduce" in text
    assert "timed with one process" not in text  # this pipeline dict says nothing was measured
    assert "Loader gives 10k/s vs 40k/s" in rec.caveats
    assert text.count("caps throughput") == 0  # the probe's note is used as it is, not repeated
    assert "exceeds the noise scale" in text  # linear scaling past B_noise overshoots


def test_a_budget_that_cut_the_training_before_the_noise_probe_is_said():
    cut = _recommend(Plan(1024, 1024, 1), noise_measured_at_step=70, noise_standard_train_steps=195)
    assert any("The budget paid for 70 of the 195 training steps" in c and "--budget" in c
               for c in cut.caveats)
    full = _recommend(Plan(1024, 1024, 1), noise_measured_at_step=195, noise_standard_train_steps=195)
    assert not any("The budget paid for" in c for c in full.caveats)


def test_a_memory_limit_set_by_a_bound_is_not_called_the_memory_edge():
    capped = _recommend(Plan(1024, 1024, 1), memory_capped_by="batch giving 10 steps an epoch")
    assert capped.rationale[0] == ("Largest batch per step: 2048, where the memory search stopped "
                                   "at the batch giving 10 steps an epoch; larger batches may fit.")
    assert "verified fit minus the margin" in _recommend(Plan(1024, 1024, 1)).rationale[0]


@pytest.mark.parametrize("steps, words", [(0, "measured at initialisation"),
                                          (1, "measured after 1 training step;"),
                                          (40, "measured after 40 training steps;")])
def test_when_the_noise_scale_was_measured_is_said_in_words(steps, words):
    rec = _recommend(Plan(1024, 1024, 1), noise_measured_at_step=steps)
    assert any(words in c for c in rec.caveats)


def test_a_plan_slower_than_the_reference_says_slower_not_faster():
    rec = _recommend(Plan(128, 32, 1, speedup_vs_reference=0.5, world_size=4))
    assert any(line.startswith("Predicted 2.00x slower to target than the reference batch 128")
               for line in rec.rationale)
    assert not any("faster to target" in line for line in rec.rationale)


def test_a_data_parallel_plan_says_the_loader_was_timed_alone():
    rec = _recommend(Plan(256, 64, 1, world_size=4),
                     input_pipeline={"measured": True, "bottleneck": False, "note": "fine"})
    assert any("timed with one process; ranks sharing a host also share its CPU cores" in c
               for c in rec.caveats)


def test_a_noise_scale_known_only_from_below_is_planned_at_its_bound_and_said_so():
    evidence = Evidence(memory_limit=2048, noise_scale=900.0, noise_status="lower_bound",
                        noise_interval=(900.0, None), noise_measured_at_step=5000,
                        noise_unlimited_batch_size=2048)
    rec = recommend(Plan(256, 256, 1), evidence, base_batch_size=128, base_learning_rate=0.1,
                    optimizer_family="sgd", steps_per_epoch=195, lr_rule="adascale")
    assert any("B_simple ≥ 900" in line and "no upper end" in line for line in rec.rationale)
    assert not any("not usable" in line for line in rec.rationale)
    bound = [c for c in rec.caveats if "only known to be at least 900" in c]
    assert len(bound) == 1 and "up to batch 2048" in bound[0]
    # AdaScale's gain takes the bound as the noise scale (no fallback to the family rule):
    # gain = (1 + 900/128) / (1 + 900/256) = 1.7778 at twice the batch.
    assert rec.lr_rule == "adascale"
    assert rec.learning_rate == pytest.approx(0.1 * (1 + 900 / 128) / (1 + 900 / 256))


def test_the_linear_rules_warning_says_when_the_noise_scale_is_only_a_bound():
    bound = _recommend(Plan(512, 512, 1), noise_scale=300.0, noise_status="lower_bound")
    assert any("exceeds the noise scale's lower bound (300)" in c for c in bound.caveats)
    known = _recommend(Plan(512, 512, 1), noise_scale=300.0)
    assert any("exceeds the noise scale (~300)" in c for c in known.caveats)


def test_a_lower_bound_that_already_settles_the_batch_adds_no_caveat():
    rec = _recommend(Plan(2048, 2048, 1), noise_scale=900.0, noise_status="lower_bound",
                     noise_unlimited_batch_size=2048)
    assert not any("only known to be at least" in c for c in rec.caveats)
