"""Ctrl-C ends a command with exit code 130 and a line that says so."""

from __future__ import annotations

import pytest

from batchscope.cli import tune_cmd
from batchscope.cli.main import run


def test_an_interrupted_tune_says_so(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_cmd, "tune", interrupted)
    with pytest.raises(SystemExit) as excinfo:
        run(["tune", "-w", "small-cnn-cifar10", "--device", "cpu", "--out", str(tmp_path)])
    # Typer turned it into exit code 130 with nothing but a newline on stderr.
    assert excinfo.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "aborted: interrupted (Ctrl-C); the run record tune had started is kept with what it "
        "had measured")
