"""The isolated probe's protocol, without spawning processes: how the parent reads what a
child left behind, and what the child writes (its `main` run in this process)."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchscope.errors import ProbeFailedError, UsageError
from batchscope.probes.memory_isolation import _interpret, main
from batchscope.workload import Workload

HERE = __name__


def tiny_workload() -> Workload:
    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
        x = torch.randn(batch_size, 4, generator=generator)
        return x.to(device), torch.randint(0, 2, (batch_size,), generator=generator).to(device)

    return Workload(
        name="tiny", build_model=lambda device: nn.Linear(4, 2).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        make_batch=make_batch, reference_batch_size=8, reference_lr=0.1,
    )


def buggy_workload() -> Workload:
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        raise KeyError("labels")

    return tiny_workload().with_settings(loss=loss)


pytestmark = pytest.mark.usefixtures("frozen_import_objects")


# -- the parent's reading ----------------------------------------------------------------------


def test_a_probe_result_is_used_with_the_parents_wall_time() -> None:
    payload = json.dumps({"probe": {"batch_size": 64, "fits": True, "peak_bytes": 1234,
                                    "seconds": 0.5, "steps": 2, "reason": "fits"}}).encode()
    probe = _interpret(64, payload, 0, "", seconds=3.25)
    assert (probe.batch_size, probe.fits, probe.peak_bytes, probe.steps) == (64, True, 1234, 2)
    assert probe.seconds == 3.25


def test_sigkill_does_not_fit() -> None:
    probe = _interpret(512, b"", -signal.SIGKILL, "", seconds=1.0)
    assert not probe.fits and probe.peak_bytes is None and probe.steps == 0
    assert "SIGKILL" in probe.reason and "out-of-memory killer" in probe.reason


def test_an_allocator_abort_does_not_fit() -> None:
    log = ("terminate called after throwing an instance of 'std::bad_alloc'\n"
           "  what():  std::bad_alloc\n")
    probe = _interpret(512, b"", -signal.SIGABRT, log, seconds=1.0)
    assert not probe.fits and "std::bad_alloc" in probe.reason


def test_a_crash_that_is_not_memory_is_an_error() -> None:
    with pytest.raises(ProbeFailedError, match="exited with code -11 without a result"):
        _interpret(512, b"", -signal.SIGSEGV, "Fatal Python error: Segmentation fault", 1.0)


def test_errors_reported_by_the_child() -> None:
    with pytest.raises(UsageError, match="bad spec"):
        _interpret(8, json.dumps({"usage": "bad spec"}).encode(), 2, "", 1.0)
    with pytest.raises(ProbeFailedError, match="model alone"):
        _interpret(8, json.dumps({"failed": "the model alone does not fit"}).encode(), 1, "", 1.0)
    with pytest.raises(ProbeFailedError, match="not an out-of-memory error"):
        _interpret(8, json.dumps({"error": "Traceback ...\nKeyError"}).encode(), 1, "", 1.0)


# -- the child's side --------------------------------------------------------------------------


def run_child(spec: str, batch_size: int = 16) -> tuple[int, dict]:
    request = {"workload": spec, "options": {}, "device": "cpu",
               "plan": {"budget_bytes": 2**30, "steps": 2, "eval_batch_factor": None},
               "batch_size": batch_size, "warm_batch_size": 2}
    read_fd, write_fd = os.pipe()
    code = main(["memory_isolation", str(write_fd), json.dumps(request)])
    with os.fdopen(read_fd, "rb") as pipe:
        return code, json.loads(pipe.read())


def test_child_writes_its_probe() -> None:
    code, response = run_child(f"{HERE}:tiny_workload")
    assert code == 0
    probe = response["probe"]
    assert probe["batch_size"] == 16 and probe["fits"] and probe["steps"] == 2
    assert probe["peak_bytes"] is not None and probe["peak_bytes"] >= 0


def test_child_reports_the_users_error_with_its_traceback() -> None:
    code, response = run_child(f"{HERE}:buggy_workload")
    assert code == 1
    assert "KeyError: 'labels'" in response["error"] and "Traceback" in response["error"]


def test_child_reports_a_usage_error() -> None:
    code, response = run_child("no_such_module_here:workload")
    assert code == 1 and "not found" in response["usage"]
