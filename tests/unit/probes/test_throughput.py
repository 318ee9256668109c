"""The throughput probe's orchestration, on workloads whose step time is known.

The workloads (throughput_fakes.py) take a known time per step, so every answer is known in
advance; most tests run them on a simulated clock. One test sleeps for real, to show the same code
measures wall time correctly, with tolerances that allow for the machine's noise. The input
pipeline check has its own file, test_throughput_pipeline.py.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.errors import ProbeFailedError, UsageError
from batchscope.probes.throughput import check_data_path, geometric_grid, measure_throughput
from batchscope.probes.timing import predicted_seconds, time_steps
from batchscope.record import to_jsonable
from batchscope.workload import Workload

sys.path.insert(0, str(Path(__file__).parent))  # the fakes live beside this file
from throughput_fakes import SimulatedClock, TimedLoss, simulated, timed_workload  # noqa: E402


# -- throughput per batch size -----------------------------------------------------------------


def test_samples_per_s_is_the_known_rate_exactly_on_a_simulated_clock():
    a, b = 0.01, 0.0001
    clock, workload = simulated(a, b)
    result = measure_throughput(workload, batch_sizes=[8, 64, 256], device="cpu", warmup_steps=1,
                                timed_steps=5, data_path=False, clock=clock)
    assert [point.batch_size for point in result.points] == [8, 64, 256]
    for point in result.points:
        assert point.samples_per_s == pytest.approx(point.batch_size / (a + b * point.batch_size))
        assert point.step_s * point.samples_per_s == pytest.approx(point.batch_size)
        # Batches are pre-built on the device: fetching one takes no time at all.
        assert point.data_s == 0.0
        assert point.compute_s == pytest.approx(a + b * point.batch_size)
        assert point.spread == pytest.approx(0.0, abs=1e-9)
        assert point.timed_steps == 5 and point.warmup_steps == 1


def test_the_real_clock_path_sees_real_sleeps():
    # The exact answers are checked on the simulated clock above; on the real clock only what a
    # loaded CI machine cannot blur is asserted: a 17x difference in throughput, and the
    # bookkeeping identities.
    a, b = 0.03, 0.0001
    result = measure_throughput(timed_workload(TimedLoss(a, b)), batch_sizes=[8, 256],
                                device="cpu", warmup_steps=1, timed_steps=3, data_path=False)
    small, large = result.points
    assert large.samples_per_s > 5 * small.samples_per_s
    for point in result.points:
        assert point.step_s * point.samples_per_s == pytest.approx(point.batch_size)
        assert point.compute_s >= a  # a sleep never takes less than asked


def test_knee_and_best_are_the_known_answer():
    # X(B) = B / (0.01 + 1e-4 B): 128 -> 5614, 256 -> 7191, 512 -> 8366 samples/s; with
    # fraction 0.8 the bar is 6693, which 256 clears and 128 does not.
    clock, workload = simulated(0.01, 0.0001)
    result = measure_throughput(workload, device="cpu", max_batch_size=512, warmup_steps=1,
                                timed_steps=3, fraction=0.8, early_stop=False, data_path=False,
                                clock=clock)
    assert [point.batch_size for point in result.points] == [8, 16, 32, 64, 128, 256, 512]
    assert result.knee_batch_size == 256
    assert result.best_batch_size == 512
    assert not result.stopped_early
    # The fitted model passes through the measured points and interpolates between them; the
    # true step time is affine here, so interpolation is exact: B/(0.01 + 1e-4 B) >= 6693 first
    # holds at B = 202.4, and the smallest multiple of 8 above that is 208.
    for point in result.points:
        assert result.samples_per_s_at(point.batch_size) == pytest.approx(point.samples_per_s)
    assert result.samples_per_s_at(192) == pytest.approx(192 / (0.01 + 0.0001 * 192))
    assert result.interpolated_knee_batch_size == 208


def test_early_stop_triggers_on_a_flat_curve():
    # Step time proportional to the batch: samples/s is the same at every size, so after the
    # third size two sizes in a row have gained nothing.
    clock, workload = simulated(0.0, 0.0003)
    result = measure_throughput(workload, device="cpu", max_batch_size=1024, warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock)
    assert [point.batch_size for point in result.points] == [8, 16, 32]
    assert result.stopped_early
    assert result.stop_reason.startswith("flattened")
    assert result.to_dict()["stopped_early"] is True


def test_early_stop_does_not_trigger_on_a_linear_curve():
    # Constant step time: samples/s doubles with every doubling of the batch.
    clock, workload = simulated(0.005, 0.0)
    result = measure_throughput(workload, device="cpu", max_batch_size=1024, warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock)
    assert [point.batch_size for point in result.points] == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert not result.stopped_early and result.stop_reason is None
    assert result.knee_batch_size == 1024 == result.best_batch_size


def test_time_budget_stops_before_a_size_that_would_overrun_it_and_says_so():
    # Constant step time 5 ms, 1 warm-up + 3 timed steps: each size costs 20 ms of simulated
    # time. After two sizes (40 ms) a third would end at 60 ms, past the 50 ms budget.
    clock, workload = simulated(0.005, 0.0)
    result = measure_throughput(workload, device="cpu", max_batch_size=1024, warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock, time_budget_s=0.05)
    assert [point.batch_size for point in result.points] == [8, 16]
    assert result.stopped_early
    assert result.stop_reason == "time budget: batch size 32 would take about 0.02 s, 0.01 s left"


def test_the_predicted_cost_follows_the_step_time_line_through_the_last_two_sizes():
    # Step time 1 ms + 10 us per example, 4 steps per size: 8 -> 16 -> ... cost 4*(1+0.01*B)
    # ms. The line through the last two sizes predicts the next one exactly, so the sweep
    # measures every size that fits in the budget and stops at the first that would not.
    clock, workload = simulated(0.001, 0.00001)
    budget = sum(4 * (0.001 + 0.00001 * size) for size in (8, 16, 32, 64, 128)) + 0.001
    result = measure_throughput(workload, device="cpu", max_batch_size=1024, warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock,
                                time_budget_s=budget, early_stop=False)
    assert [point.batch_size for point in result.points] == [8, 16, 32, 64, 128]
    cost_256 = 4 * (0.001 + 0.00001 * 256)
    assert result.stop_reason == (f"time budget: batch size 256 would take about "
                                  f"{cost_256:.3g} s, 0.001 s left")
    assert result.seconds <= budget


def test_a_curve_that_keeps_gaining_a_little_is_not_cut_short():
    # Gains of 6% per doubling: above the 5% bar of fraction 0.95, so the search goes on.
    clock, workload = simulated(0.0, 0.0)
    steps = {8: 0.08 / 1.0, 16: 0.16 / 1.06, 32: 0.32 / 1.06**2, 64: 0.64 / 1.06**3}
    workload = timed_workload(
        lambda model, batch: (clock.advance(steps[batch[0].shape[0]]),
                              model(batch[0]).sum())[1])
    result = measure_throughput(workload, device="cpu", max_batch_size=64, warmup_steps=0,
                                timed_steps=1, data_path=False, clock=clock)
    assert [point.batch_size for point in result.points] == [8, 16, 32, 64]
    assert not result.stopped_early


@pytest.mark.parametrize("warmup_steps", [4, 0])
def test_warmup_steps_are_excluded_from_the_median(warmup_steps):
    steady, slow_extra = 0.005, 0.15
    clock, workload = simulated(steady, 0.0, slow_calls=4, slow_extra=slow_extra)
    result = measure_throughput(workload, device="cpu", batch_sizes=[16],
                                warmup_steps=warmup_steps, timed_steps=3, data_path=False,
                                clock=clock)
    (point,) = result.points
    if warmup_steps == 4:
        assert point.step_s == pytest.approx(steady)
        assert point.warmup_steps == 4
    else:  # the check above can fail: without warm-up the slow steps are what gets timed
        assert point.step_s == pytest.approx(steady + slow_extra)


def test_time_cap_per_point_cuts_warmup_and_timed_steps():
    # 40 ms steps, 0.1 s cap: warm-up stops once over the cap (after 3 steps, at 0.12 s) and
    # the timed loop after its minimum of 3 steps.
    clock, workload = simulated(0.04, 0.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[8], warmup_steps=5,
                                timed_steps=10, max_seconds_per_point=0.1, data_path=False,
                                clock=clock)
    (point,) = result.points
    assert (point.warmup_steps, point.timed_steps) == (3, 3)
    assert point.step_s == pytest.approx(0.04)


# -- input pipeline ----------------------------------------------------------------------------


# -- out of memory, errors ---------------------------------------------------------------------


def test_out_of_memory_stops_growing_and_keeps_the_measured_points():
    clock, workload = simulated(0.001, 0.0, oom_from=64)
    result = measure_throughput(workload, device="cpu", max_batch_size=256, warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock)
    assert [point.batch_size for point in result.points] == [8, 16, 32]
    assert result.curve.oom_batch_size == 64
    assert result.stopped_early
    assert "out of memory at batch size 64" in result.stop_reason
    assert "CUDA out of memory" in result.stop_reason
    assert result.to_dict()["oom_batch_size"] == 64


def test_out_of_memory_at_the_smallest_size_fails_the_probe():
    clock, workload = simulated(0.001, 0.0, oom_from=1)
    with pytest.raises(ProbeFailedError, match="smallest, 8, ran out of memory"):
        measure_throughput(workload, device="cpu", max_batch_size=32, warmup_steps=1,
                           timed_steps=3, data_path=False, clock=clock)


def test_errors_that_are_not_out_of_memory_propagate_unchanged():
    error = KeyError("label")

    def broken_loss(model, batch):
        raise error

    with pytest.raises(KeyError) as excinfo:
        measure_throughput(timed_workload(broken_loss), device="cpu", batch_sizes=[8],
                           warmup_steps=1, timed_steps=3)
    assert excinfo.value is error


# -- variants, units ---------------------------------------------------------------------------


def test_a_variant_reports_what_it_buys():
    # A variant is the workload with some fields replaced; here its loss takes half as long, so
    # it is twice as fast. (bf16 autocast itself is no test subject on a CPU without native
    # bf16, where it is slower; the GPU benchmark measures it.)
    clock, workload = simulated(0.008, 0.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[8, 16], warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock,
                                variants={"half-time": {"loss": TimedLoss(0.004, 0.0, clock),
                                                        "autocast_dtype": None}})
    (variant,) = result.variants
    assert variant.name == "half-time"
    assert variant.speedup == pytest.approx(2.0)
    data = variant.to_dict()
    assert data["settings"]["autocast_dtype"] is None
    assert [point["batch_size"] for point in data["points"]] == [8, 16]
    assert data["speedup_vs_base"] == pytest.approx(2.0)
    assert data["best_batch_size"] == 16


def test_default_variant_is_bf16_with_channels_last():
    clock, workload = simulated(0.001, 0.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[8], warmup_steps=0,
                                timed_steps=1, variants=True, clock=clock)
    (variant,) = result.to_dict()["variants"]
    assert variant["name"] == "bf16+channels_last"
    assert variant["settings"] == {"autocast_dtype": "bfloat16", "channels_last": True}


def test_a_variant_that_does_not_fit_leaves_the_main_curve_and_says_why():
    clock, workload = simulated(0.001, 0.0)
    result = measure_throughput(workload, device="cpu", batch_sizes=[8, 16], warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock,
                                variants={"huge": {"loss": TimedLoss(0.001, 0.0, clock,
                                                                     oom_from=1)}})
    assert [point.batch_size for point in result.points] == [8, 16]
    assert result.variants == ()
    assert any(note.startswith("variant huge not measured") for note in result.notes)


def test_a_variant_naming_no_workload_field_is_a_usage_error():
    clock, workload = simulated(0.001, 0.0)
    with pytest.raises(UsageError, match=r"variant 'fast' sets \['turbo'\]"):
        measure_throughput(workload, device="cpu", batch_sizes=[8], clock=clock,
                           variants={"fast": {"turbo": True}})


def test_token_workloads_report_tokens_per_second():
    def make_sequences(batch_size, device, generator):
        return (torch.randn(batch_size, 16, 4, generator=generator),
                torch.randn(batch_size, 16, 1, generator=generator))

    clock = SimulatedClock()
    workload = timed_workload(TimedLoss(0.002, 0.0, clock), make_batch=make_sequences,
                              unit="tokens", count=lambda batch: batch[0].shape[0] * batch[0].shape[1])
    result = measure_throughput(workload, device="cpu", batch_sizes=[8], warmup_steps=1,
                                timed_steps=3, clock=clock)
    (point,) = result.to_dict()["points"]
    assert point["tokens_per_step"] == 8 * 16
    assert point["tokens_per_s"] == pytest.approx(8 * 16 / 0.002)
    assert point["samples_per_s"] == pytest.approx(8 / 0.002)


# -- guarantees, result shape, arguments -------------------------------------------------------


def _measure_with_a_variant(workload):
    # The channels_last variant converts the very model `from_objects` hands back, in place.
    measure_throughput(workload, device="cpu", batch_sizes=[4, 8], warmup_steps=1, timed_steps=3,
                       variants={"channels_last": {"channels_last": True}})


def _check_the_data_path(workload):
    check_data_path(workload, 8, device="cpu", warmup_steps=1, timed_steps=3)


@pytest.mark.parametrize("probe", [_measure_with_a_variant, _check_the_data_path],
                         ids=["measure_throughput", "check_data_path"])
def test_user_model_optimizer_and_rng_are_untouched(probe):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 1))
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    strides = [p.stride() for p in model.parameters()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    def images(batch_size, device, generator):
        return (torch.randn(batch_size, 3, 6, 6, generator=generator),
                torch.randn(batch_size, 1, generator=generator))

    def loader(batch_size, device):  # draws from the global RNG, as augmentations do
        for _ in range(4):
            yield torch.randn(batch_size, 3, 6, 6), torch.randn(batch_size, 1)

    workload = Workload.from_objects(
        model, optimizer, lambda m, batch: nn.functional.mse_loss(m(batch[0]), batch[1]), images,
        reference_batch_size=8, data_loader=loader)
    probe(workload)

    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for param, buffer in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[param]["momentum_buffer"], buffer)
    assert [p.stride() for p in model.parameters()] == strides  # channels_last undone
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


def test_result_is_json_with_the_documented_keys():
    clock, workload = simulated(0.001, 0.0)
    result = measure_throughput(workload, device="cpu", max_batch_size=16, warmup_steps=1,
                                timed_steps=3, clock=clock)
    data = json.loads(json.dumps(to_jsonable(result.to_dict()), allow_nan=False))
    for key in ("points", "knee_batch_size", "best_batch_size", "seconds", "model", "fraction",
                "input_pipeline", "variants", "stopped_early", "stop_reason", "device"):
        assert key in data
    assert data["device"] == "cpu" and data["fraction"] == 0.95
    assert set(data["points"][0]) >= {"batch_size", "samples_per_s", "step_s", "spread",
                                      "data_s", "compute_s"}
    assert "tokens_per_s" not in data["points"][0]  # an examples workload
    assert data["grid"] == [8, 16] and data["max_batch_size_source"] == "max_batch_size"


def test_cpu_default_cap_and_dataset_size_are_stated():
    clock, workload = simulated(0.0005, 0.0)
    result = measure_throughput(workload, device="cpu", warmup_steps=0, timed_steps=1,
                                data_path=False, early_stop=False, clock=clock)
    assert result.grid == (8, 16, 32, 64, 128, 256)
    assert result.max_batch_size_source == "CPU default"
    assert any("256" in note and "max_batch_size" in note for note in result.notes)

    small = measure_throughput(workload.with_settings(dataset_size=100), device="cpu",
                               warmup_steps=0, timed_steps=1, data_path=False, early_stop=False,
                               clock=clock)
    assert small.grid == (8, 16, 32, 64, 100)
    assert small.max_batch_size_source == "dataset size"


def test_on_an_accelerator_the_grid_goes_up_to_the_memory_probes_recommendation(monkeypatch):
    from batchscope.probes import memory, throughput

    calls = []

    class Found:
        recommended_batch_size = 100

    def fake_probe_memory(workload, *, device, **options):
        calls.append((workload.name, device, options))
        return Found()

    monkeypatch.setattr(memory, "probe_memory", fake_probe_memory)
    notes: list[str] = []
    accelerator = torch.device("meta")  # any non-CPU device takes the accelerator path
    plan = throughput._plan_grid(timed_workload(TimedLoss(0, 0)), accelerator, None, None, notes)
    assert plan == ([8, 16, 32, 64, 100], 100, "memory probe")
    assert calls == [("timed", accelerator, {})]
    assert notes == []


@pytest.mark.parametrize(("cap", "grid"), [
    (256, [8, 16, 32, 64, 128, 256]),
    (320, [8, 16, 32, 64, 128, 256, 320]),
    (260, [8, 16, 32, 64, 128, 256]),
    (8, [8]),
    (5, [5]),
])
def test_geometric_grid(cap, grid):
    assert geometric_grid(cap) == grid


def test_min_batch_size_starts_the_default_grid_there():
    from batchscope.probes import throughput

    notes: list[str] = []
    grid, cap, _ = throughput._plan_grid(timed_workload(TimedLoss(0, 0)), torch.device("cpu"), None,
                                         300, notes, min_batch_size=32)
    assert grid == [32, 64, 128, 256] and cap == 300
    with pytest.raises(UsageError, match="min_batch_size=0"):
        throughput._plan_grid(timed_workload(TimedLoss(0, 0)), torch.device("cpu"), None, 300, notes,
                              min_batch_size=0)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"fraction": 1.5}, "fraction=1.5"),
    ({"batch_sizes": [8, 0]}, "batch size=0"),
    ({"batch_sizes": []}, "batch_sizes=[]"),
    ({"max_batch_size": -4}, "max_batch_size=-4"),
    ({"batch_sizes": [64], "max_batch_size": 32}, "max_batch_size=32"),
    ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"timed_steps": 0}, "timed_steps=0"),
    ({"variants": "bf16"}, "variants='bf16'"),
    ({"max_seconds_per_point": 0}, "max_seconds_per_point=0"),
])
def test_bad_arguments_are_one_line_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError) as excinfo:
        measure_throughput(timed_workload(TimedLoss(0, 0)), device="cpu", **kwargs)
    assert fragment in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("step_s", [0.5, 3.0, 4.0, 11.0])
@pytest.mark.parametrize("max_seconds", [None, 10.0])
@pytest.mark.parametrize(("warmup", "timed"), [(0, 1), (3, 10), (1, 2), (5, 5)])
def test_predicted_seconds_replays_the_timing_loop_exactly(step_s, max_seconds, warmup, timed):
    clock = SimulatedClock()
    started = clock()
    time_steps(lambda batch: clock.advance(step_s), lambda: None, torch.device("cpu"),
               warmup_steps=warmup, timed_steps=timed, max_seconds=max_seconds, clock=clock)
    assert predicted_seconds(step_s, warmup_steps=warmup, timed_steps=timed,
                             max_seconds=max_seconds) == pytest.approx(clock() - started)


def test_a_capped_point_is_predicted_at_what_the_cap_really_allows():
    # 4 s a step, 10 s cap per point: a point still takes 3 warm-up steps (the third crosses
    # the cap) and 3 timed ones, 24 s, not 10. With 60 s: 8 and 16 run (48 s), 32 does not.
    clock, workload = simulated(4.0, 0.0)
    result = measure_throughput(workload, device="cpu", max_batch_size=1024, warmup_steps=3,
                                timed_steps=10, data_path=False, clock=clock, time_budget_s=60,
                                max_seconds_per_point=10)
    assert [point.batch_size for point in result.points] == [8, 16]
    assert result.stop_reason == "time budget: batch size 32 would take about 24 s, 12 s left"
    assert result.seconds <= 60


def test_a_budget_spent_by_the_first_size_keeps_that_size_alone():
    clock, workload = simulated(0.05, 0.0)
    result = measure_throughput(workload, device="cpu", max_batch_size=1024, warmup_steps=1,
                                timed_steps=3, data_path=False, clock=clock, time_budget_s=0.1)
    assert [point.batch_size for point in result.points] == [8]
    assert result.stop_reason == "time budget: batch size 16 would take about 0.2 s, 0 s left"
    assert result.knee_batch_size == 8
