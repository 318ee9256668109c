"""The CLI's contract: --version, workloads, one-line usage errors with exit code 2, and user
errors keeping their traceback."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from batchscope import __version__
from batchscope.cli.main import run


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as excinfo:
        run(list(argv))
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"batchscope {__version__}"


def test_workloads_json_lists_the_seed_with_its_reference_settings(capsys):
    code, out, _ = _run(capsys, "workloads", "--json")
    assert code == 0
    entries = {entry["name"]: entry for entry in json.loads(out)["workloads"]}
    seed = entries["resnet18-cifar10"]
    assert (seed["reference_batch_size"], seed["reference_lr"], seed["optimizer_family"]) == (128, 0.1, "sgd")
    assert seed["schedule"] == "cosine"
    assert "small-cnn-cifar10" in entries


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["tune"], "Missing option '--workload'"),
        (["tune", "-w", "small-cnn-cifar10", "--bogus"], "No such option: --bogus"),
        (["tune", "-w", "no-such-workload"], "unknown workload 'no-such-workload'"),
        (["tune", "-w", "small-cnn-cifar10", "--budget", "3"], "budget=3.0 seconds is too small"),
        (["tune", "-w", "small-cnn-cifar10", "--lr-rule", "cubic"], "LR rule 'cubic' is unknown"),
        (["tune", "-w", "small-cnn-cifar10", "--target", "accuracy"], "target='accuracy'"),
        (["tune", "-w", "small-cnn-cifar10", "--device", "tpu"], "device 'tpu'"),
        (["tune", "-w", "small-cnn-cifar10", "-o", "train_size"], "is not KEY=VALUE"),
        (["tune", "-w", "bad.spec:"], "not of the form 'package.module:function'"),
        (["report", "/nonexistent/run.json"], "does not exist"),
        (["tune", "-w", "small-cnn-cifar10", "--distributed", "--world-size", "2"], "drop --world-size"),
        (["tune", "-w", "small-cnn-cifar10", "--distributed"],
         "--distributed needs the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
         "MASTER_PORT missing); launch with: torchrun"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(capsys, monkeypatch, argv, fragment):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # as outside torchrun
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    assert fragment in err


def test_an_explicit_device_index_under_torchrun_is_refused_before_joining(capsys, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    code, out, err = _run(capsys, "tune", "-w", "small-cnn-cifar10", "--distributed", "--device", "cuda:1")
    assert code == 2 and out == ""
    assert err.startswith("error: --device cuda:1 under torchrun puts all 2 ranks of this host on one "
                          "device; pass --device cuda")


def test_unwritable_output_dir_is_a_usage_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = _run(capsys, "tune", "-w", "small-cnn-cifar10", "--out", str(blocker / "sub"))
    assert code == 2
    assert "is not writable" in err


def test_errors_in_user_code_keep_their_traceback(tmp_path, monkeypatch):
    (tmp_path / "crashing_workload.py").write_text(textwrap.dedent("""
        def make():
            raise ZeroDivisionError("inside the user's factory")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ZeroDivisionError, match="inside the user's factory"):
        run(["tune", "-w", "crashing_workload:make"])
    sys.modules.pop("crashing_workload", None)


def test_a_probe_that_finds_nothing_is_one_line_with_exit_code_1(tmp_path, monkeypatch, capsys):
    # A budget of 1 KiB fits nothing: an answer about the machine, not a usage error or a bug.
    (tmp_path / "tiny_workload.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from batchscope import Workload

        def make():
            return Workload(
                # 1 MiB of input per example: above glibc's mmap threshold, so every batch is
                # a fresh mapping that the resident-memory peak always sees
                name="tiny", build_model=lambda d: nn.Linear(1 << 18, 2).to(d),
                build_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr),
                loss=lambda m, b: m(b).sum(),
                make_batch=lambda b, d, g: torch.randn(b, 1 << 18, generator=g).to(d),
                reference_batch_size=8, reference_lr=0.1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = _run(capsys, "probe", "memory", "-w", "tiny_workload:make", "--device", "cpu",
                          "--memory-budget", "1KiB")
    sys.modules.pop("tiny_workload", None)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: not even batch size")


def test_console_text_from_runs_is_printed_verbatim_not_as_markup(capsys):
    from batchscope.cli.common import console

    console.print("[enforce fail at alloc_cpu.cpp:127] and a stray [/x]")
    assert capsys.readouterr().out.strip() == "[enforce fail at alloc_cpu.cpp:127] and a stray [/x]"
