"""The noise estimators on a CUDA device: same numbers as on the CPU, and fp16 autocast with a
GradScaler measured in unscaled units. Skipped without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from batchscope.probes.noise import estimate_noise_scale
from batchscope.probes.noise_online import GradientNoiseMonitor

sys.path.insert(0, str(Path(__file__).parent))  # the shared problems live beside this file
from test_noise_problems import linear_model, linear_workload  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _one_step(device: str) -> tuple[float, float]:
    workload = linear_workload()
    model = linear_model(device)
    generator = torch.Generator().manual_seed(4)
    with GradientNoiseMonitor(model, 4, every=1) as monitor:
        for _ in range(8):
            workload.loss(model, workload.make_batch(4, torch.device(device), generator)).backward()
        sample = monitor.step()
    return sample.sq_norm_small, sample.sq_norm_big


def test_monitor_reads_the_same_norms_on_cuda_as_on_cpu():
    cpu, cuda = _one_step("cpu"), _one_step("cuda")
    assert cuda == pytest.approx(cpu, rel=1e-4)


def test_fp16_autocast_with_grad_scaler_matches_full_precision():
    options = dict(steps=40, micro_batch_size=4, accumulation=8, seed=0)
    full = estimate_noise_scale(linear_workload(), "cuda", **options)
    half = estimate_noise_scale(linear_workload().with_settings(autocast_dtype=torch.float16), "cuda", **options)
    # Same batches; fp16 matmuls round the residuals (~1e-3 relative), the scaler is divided out.
    assert half.grad_sq_norm == pytest.approx(full.grad_sq_norm, rel=2e-2)
    assert half.trace_sigma == pytest.approx(full.trace_sigma, rel=2e-2)
    assert half.b_simple == pytest.approx(full.b_simple, rel=3e-2)
