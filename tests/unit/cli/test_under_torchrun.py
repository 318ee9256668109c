"""Commands that measure one device refuse to run as several torchrun processes: one line, exit
code 2, before anything is measured or written. A torchrun job of one process, and
`tune --distributed` (built for torchrun), go on."""

from __future__ import annotations

import pytest

from batchscope.cli import common, probe_memory, probe_noise, probe_throughput, sweep_cmd, tune_cmd
from batchscope.cli.main import run

WORKLOAD = "small-cnn-cifar10"
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")
PROBE_FIX = (f"a probe measures one device: run it once, without torchrun (batchscope probe {{probe}} "
             f"-w {WORKLOAD} ...), or for a data-parallel plan run torchrun ... -m batchscope tune "
             f"-w {WORKLOAD} --distributed")

# Each command and the first thing it does after the check: what must never run when it refuses.
FIRST_STEPS = {
    "probe memory": [(probe_memory, "record_path"), (probe_memory, "probe_memory")],
    "probe throughput": [(probe_throughput, "record_path"), (probe_throughput, "measure_throughput")],
    "probe noise": [(probe_noise, "record_path"), (probe_noise, "estimate_noise_scale")],
    "sweep": [(sweep_cmd, "sweep")],
    "tune": [(tune_cmd, "tune")],
}
ARGV = {
    "probe memory": ["probe", "memory", "-w", WORKLOAD, "--device", "cpu", "--memory-budget", "64MiB"],
    "probe throughput": ["probe", "throughput", "-w", WORKLOAD, "--device", "cpu"],
    "probe noise": ["probe", "noise", "-w", WORKLOAD, "--device", "cpu"],
    "sweep": ["sweep", "-w", WORKLOAD, "-b", "8,16", "--device", "cpu"],
    "tune": ["tune", "-w", WORKLOAD, "--device", "cpu"],
}


class Reached(Exception):
    """Raised by a command's first step: the command went past the torchrun check."""


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as excinfo:
        run(list(argv))
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def _torchrun_environment(monkeypatch, world: int, rank: int, **extra: str) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "LOCAL_WORLD_SIZE": str(world), **extra}.items():
        monkeypatch.setenv(name, value)


def _first_steps_raise(monkeypatch, command: str, error: type[BaseException]) -> None:
    def step(*args, **kwargs):
        raise error(f"{command} went past the torchrun check")

    for module, name in FIRST_STEPS[command]:
        monkeypatch.setattr(module, name, step)


@pytest.mark.parametrize(
    ("command", "fix"),
    [
        ("probe memory", PROBE_FIX.format(probe="memory")),
        ("probe throughput", PROBE_FIX.format(probe="throughput")),
        ("probe noise", PROBE_FIX.format(probe="noise")),
        ("sweep", "run it once, without torchrun (for trials in parallel: one `batchscope sweep` per "
                  "device sharing --storage and --study, or --backend ray), or for a data-parallel "
                  f"plan run torchrun ... -m batchscope tune -w {WORKLOAD} --distributed"),
        ("tune", "add --distributed (rank 0 measures for the job, every rank checks the batch), or "
                 "run it once without torchrun with --world-size 3 to plan for 3 devices"),
    ],
)
def test_every_rank_refuses_in_one_line_naming_what_it_saw_and_the_fix(capsys, monkeypatch, command, fix):
    _torchrun_environment(monkeypatch, world=3, rank=1)
    _first_steps_raise(monkeypatch, command, AssertionError)  # a refusal never gets there
    code, out, err = _run(capsys, *ARGV[command])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: batchscope {command} is running as one of 3 processes of a "
                          f"torchrun job (WORLD_SIZE=3, RANK=1): ")
    assert err.rstrip("\n").endswith(f"; {fix}")


def test_tune_with_a_world_size_under_torchrun_is_still_refused(capsys, monkeypatch):
    # --world-size plans for N devices from one process; N processes would each plan it.
    _torchrun_environment(monkeypatch, world=2, rank=0)
    _first_steps_raise(monkeypatch, "tune", AssertionError)
    code, _, err = _run(capsys, *ARGV["tune"], "--world-size", "2")
    assert code == 2
    assert "(WORLD_SIZE=2, RANK=0): without --distributed every rank would tune on its own" in err


@pytest.mark.parametrize("command", ["probe memory", "probe throughput", "probe noise"])
def test_a_refused_probe_leaves_an_existing_out_file_as_it_was(capsys, monkeypatch, tmp_path, command):
    _torchrun_environment(monkeypatch, world=2, rank=0)
    existing = tmp_path / "record.json"
    existing.write_text('{"kind": "an earlier run"}')
    code, _, _ = _run(capsys, *ARGV[command], "--out", str(existing))
    assert code == 2
    assert existing.read_text() == '{"kind": "an earlier run"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]  # no temporary left


@pytest.mark.parametrize("command", ["probe memory", "probe throughput", "probe noise", "sweep", "tune"])
def test_a_refused_command_creates_no_out_directory(capsys, monkeypatch, tmp_path, command):
    # record_path creates a missing parent; the refusal comes before it.
    _torchrun_environment(monkeypatch, world=2, rank=0)
    code, _, _ = _run(capsys, *ARGV[command], "--out", str(tmp_path / "new" / "out"))
    assert code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", sorted(ARGV))
def test_a_torchrun_job_of_one_process_is_not_refused(monkeypatch, command):
    _torchrun_environment(monkeypatch, world=1, rank=0)
    _first_steps_raise(monkeypatch, command, Reached)
    with pytest.raises(Reached, match="went past the torchrun check"):
        run(ARGV[command])


def test_tune_distributed_goes_on_to_join_the_job(capsys, monkeypatch):
    # No MASTER_ADDR/PORT: joining fails with its own message, which only comes after the check.
    _torchrun_environment(monkeypatch, world=2, rank=1)
    code, out, err = _run(capsys, *ARGV["tune"], "--distributed")
    assert code == 2 and out == ""
    assert err.startswith("error: --distributed needs the environment torchrun sets (MASTER_ADDR, "
                          "MASTER_PORT missing)")


@pytest.mark.parametrize(
    ("environ", "job"),
    [
        ({}, None),
        ({"WORLD_SIZE": "2"}, None),  # no rank beside it: not a launcher's
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, None),
        ({"WORLD_SIZE": "two", "RANK": "0"}, None),
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, (4, "RANK=3")),
        ({"WORLD_SIZE": "8", "LOCAL_RANK": "5"}, (8, "LOCAL_RANK=5")),
    ],
)
def test_torchrun_processes_reads_the_launchers_variables(environ, job):
    assert common.torchrun_processes(environ) == job
