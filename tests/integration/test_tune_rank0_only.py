"""`batchscope.tune(workload)` called on rank 0 only of an initialised two-process gloo job (the
"if rank == 0:" pattern) must refuse at once, naming `world_size=`, instead of waiting in the
collectives of the every-rank path for ranks that never come.

Before `tune(distributed=True)` was an explicit opt-in, such a call took the every-rank path
and waited in `dist.new_group` (tune_distributed._coordination_group) for the coordination
group's timeout, at least 30 minutes. So the job runs in a child process with a hard limit and
is killed (with every rank it spawned) when the limit passes. Run as a script it is that child:
`python test_tune_rank0_only.py DIR`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gloo_group import gloo_process_group, spawn_ranks  # noqa: E402

WORLD = 2
LIMIT_S = 60  # three interpreters importing torch on two busy cores, then one refusal (~5 s idle)


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import batchscope

    report: dict = {}
    with gloo_process_group(rank, world, init_file):
        if rank == 0:
            try:
                batchscope.tune("small-cnn-cifar10", device="cpu", budget_s=10, memory_budget="256MiB",
                                workload_options={"train_size": 512, "test_size": 128})
                report["returned"] = True
            except Exception as exc:  # noqa: BLE001 - what rank 0 raised is the result
                report["error"] = f"{type(exc).__name__}: {exc}"
        # rank 1 goes straight on to the job's next collective (gloo_process_group's barrier),
        # as the rest of a training script would
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


pytestmark = pytest.mark.slow


def test_tune_on_rank_zero_alone_refuses_instead_of_waiting_for_the_others(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    # Its own session: a hang is ended by killing this child's process group (it and the ranks
    # it spawned), nothing else.
    child = subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail(f"tune on rank 0 alone was still waiting after {LIMIT_S} s")
    assert child.returncode == 0, output[-3000:]
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert second == {}
    assert first["error"].startswith("UsageError: ")
    assert "world_size=2" in first["error"]


if __name__ == "__main__":
    spawn_ranks(run_rank, WORLD, Path(sys.argv[1]))
