"""Memory probes each in a fresh process (`probe_memory(..., isolate=True)`).

Why: some failures cannot be survived in-process. The OS out-of-memory killer sends SIGKILL;
a CUDA error can leave the context unusable; an allocator may stay fragmented. A child process
per probe makes every probe start from a clean device, and turns "the process died of memory"
into an ordinary "does not fit".

The child rebuilds the workload from its name or `module:function` spec (plus JSON options) and
writes exactly one JSON object to a pipe it was handed (not stdout, which the user's code may
print to). How the parent reads the outcome:
- a probe result: used as is (its wall time is replaced by the parent's, process start
  included: that is what the isolated probe cost);
- killed by SIGKILL, or died with an allocator abort (`std::bad_alloc`, an OOM message) before
  it could answer: does not fit;
- the user's input was wrong: `UsageError` with the child's message;
- anything else (the user's code raised, the child crashed): `ProbeFailedError` carrying the
  child's traceback or log tail, because calling a bug "does not fit" would hide it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchscope.errors import ProbeFailedError, UsageError
from batchscope.oom import OOM_MARKERS
from batchscope.probes.memory_runner import InProcessRunner, MemoryProbe, ProbePlan

_CHILD_MODULE = "batchscope.probes.memory_isolation"
_ABORT_MARKERS = ("std::bad_alloc", "MemoryError", *OOM_MARKERS)
_LOG_TAIL_CHARS = 2000


@dataclass(frozen=True)
class IsolatedRunner:
    """Runs each probe in a new Python process; the workload travels as its spec."""

    workload_spec: str
    workload_options: dict[str, Any]
    device: torch.device
    plan: ProbePlan
    warm_batch_size: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)

    def probe(self, batch_size: int) -> MemoryProbe:
        request = {
            "workload": self.workload_spec,
            "options": self.workload_options,
            "device": str(self.device),
            "plan": asdict(self.plan),
            "batch_size": batch_size,
            "warm_batch_size": self.warm_batch_size,
        }
        started = time.perf_counter()
        payload, returncode, log_text = self._run_child(json.dumps(request))
        seconds = time.perf_counter() - started
        return _interpret(batch_size, payload, returncode, log_text, seconds)

    def close(self) -> None:
        return None

    def _run_child(self, request: str) -> tuple[bytes, int, str]:
        read_fd, write_fd = os.pipe()
        with tempfile.TemporaryFile() as log:
            try:
                child = subprocess.Popen(
                    [sys.executable, "-m", _CHILD_MODULE, str(write_fd), request],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(write_fd,), env=self._env(),
                )
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)  # the child holds its copy; EOF arrives when it exits
            try:
                with os.fdopen(read_fd, "rb") as pipe:
                    payload = pipe.read()
                returncode = child.wait()
            except BaseException:  # Ctrl-C while waiting: no orphan keeps the device busy
                child.kill()
                child.wait()
                raise
            log.seek(0)
            log_text = log.read().decode("utf-8", errors="replace")
        return payload, returncode, log_text

    def _env(self) -> dict[str, str]:
        # The child must import what the parent could (an entry point found via the current
        # directory or a test's sys.path entry), so it gets the parent's import path.
        env = dict(os.environ)
        paths = [p for p in sys.path if p] + [os.getcwd()]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update(self.extra_env)
        return env


def _interpret(
    batch_size: int, payload: bytes, returncode: int, log_text: str, seconds: float
) -> MemoryProbe:
    response: dict[str, Any] = {}
    if payload.strip():
        try:
            response = json.loads(payload)
        except json.JSONDecodeError:
            response = {}
    if "probe" in response:
        probe = MemoryProbe.from_dict(response["probe"])
        return MemoryProbe(probe.batch_size, probe.fits, probe.peak_bytes, seconds, probe.steps,
                           probe.reason)
    if "usage" in response:
        raise UsageError(str(response["usage"]))
    if "failed" in response:
        raise ProbeFailedError(str(response["failed"]))
    if "error" in response:
        raise ProbeFailedError(
            f"the isolated probe at batch size {batch_size} raised an error in the workload's "
            f"code (not an out-of-memory error):\n{response['error']}"
        )
    if returncode == -signal.SIGKILL:
        return MemoryProbe(batch_size, False, None, seconds, 0,
                           "killed by SIGKILL (most likely the OS out-of-memory killer)")
    tail = log_text[-_LOG_TAIL_CHARS:]
    if returncode != 0 and any(marker in tail for marker in _ABORT_MARKERS):
        last_line = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        return MemoryProbe(batch_size, False, None, seconds, 0,
                           f"process died out of memory (exit {returncode}): {last_line.strip()}")
    raise ProbeFailedError(
        f"the isolated probe at batch size {batch_size} exited with code {returncode} without "
        f"a result; its output ended with:\n{tail}"
    )


# -- the child ---------------------------------------------------------------------------------


def _child_probe(request: dict[str, Any]) -> MemoryProbe:
    from batchscope.device import resolve_device
    from batchscope.workload import resolve_workload

    device = resolve_device(request["device"])
    workload = resolve_workload(request["workload"], **request["options"])
    plan = ProbePlan(**request["plan"])
    # No guard: this process exists only for the probe, and a snapshot would cost memory.
    runner = InProcessRunner(workload, device, plan, guard=None,
                             warm_batch_size=int(request["warm_batch_size"]))
    try:
        return runner.probe(int(request["batch_size"]))
    finally:
        runner.close()  # the process ends next, but main() also runs in tests' own processes


def main(argv: list[str]) -> int:
    write_fd, request = int(argv[1]), json.loads(argv[2])
    code = 1
    try:
        response: dict[str, Any] = {"probe": _child_probe(request).to_dict()}
        code = 0
    except UsageError as exc:
        response = {"usage": str(exc)}
    except ProbeFailedError as exc:
        response = {"failed": str(exc)}
    except Exception:
        response = {"error": traceback.format_exc()}
    with os.fdopen(write_fd, "w", encoding="utf-8") as pipe:
        json.dump(response, pipe)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
