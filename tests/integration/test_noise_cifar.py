"""The noise probe end to end on the real small CIFAR-10 workload (real JPEG data, on-device
augmentation, BatchNorm, a few training steps first), on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchscope.probes.noise import estimate_noise_scale

pytestmark = pytest.mark.slow


def test_small_cnn_probe_runs_end_to_end_and_says_what_it_measured():
    torch_state = torch.get_rng_state()
    result = estimate_noise_scale(
        "small-cnn-cifar10", "cpu", steps=4, micro_batch_size=8, accumulation=2, train_steps=2, seed=0,
    )
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # plain JSON, no NaN/inf
    assert (data["samples"], data["micro_batch_size"], data["big_batch_size"]) == (4, 8, 16)
    assert data["unit"] == "examples" and "b_simple_tokens" not in data
    assert data["status"] in ("ok", "lower_bound", "unstable", "negative_g2")
    # Ten classes at (near) initialisation: per-example gradients differ far more than they
    # agree, so the noise term is positive and finite whatever |G|^2 turned out to be.
    assert math.isfinite(data["trace_sigma"]) and data["trace_sigma"] > 0
    assert any("BatchNorm in train mode" in note for note in data["notes"])
    assert any("2 training step" in note for note in data["notes"])
    assert torch.equal(torch.get_rng_state(), torch_state)
