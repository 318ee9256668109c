"""`batchscope tune --distributed` launched by torchrun with two CPU ranks: the command a
multi-GPU user runs, end to end (env:// rendezvous, gloo, one recommendation printed once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_torchrun_two_ranks_print_one_recommendation_checked_on_both(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "batchscope", "tune",
         "-w", "small-cnn-cifar10", "-o", "train_size=1024", "--device", "cpu", "--budget", "10",
         "--memory-budget", "256MiB", "--distributed", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = json.loads(done.stdout)  # one document: only rank 0 prints
    rec, ranks = sections["recommendation"], sections["ranks"]
    assert rec["world_size"] == ranks["world_size"] == sections["settings"]["world_size"] == 2
    assert rec["batch_size"] == 2 * rec["per_device_batch_size"] * rec["grad_accumulation"]
    assert [(c["rank"], c["fits"]) for c in ranks["checked"]] == [(0, True), (1, True)]
    assert ranks["allreduce_s"] > 0 and ranks["allreduce_bytes"] > 0
    written = json.loads((out / "run.json").read_text())
    assert written["sections"]["ranks"] == ranks and (out / "report.html").exists()
