"""--help is honest: options that take no value are shown without one, and -v says it repeats."""

from __future__ import annotations

import logging

import pytest

from batchscope.cli.main import run

COMMANDS = [[], ["workloads"], ["tune"], ["report"], ["sweep"], ["probe"], ["probe", "memory"],
            ["probe", "throughput"], ["probe", "noise"]]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        run(list(argv))
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


@pytest.mark.parametrize("command", COMMANDS, ids=lambda words: " ".join(words) or "batchscope")
def test_flags_are_shown_without_a_value(capsys, command):
    code, out, _ = _run(capsys, *command, "--help")
    assert code == 0
    assert "<bool>" not in out and "<list[str]>" not in out  # -o shows KEY=VALUE
    assert "--help  " in out and "Show this message and exit." in out


def test_verbose_is_shown_as_a_repeatable_flag(capsys):
    _, out, _ = _run(capsys, "--help")
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("-")}
    assert lines["-v,"].split() == ["-v,", "--verbose", "More", "log", "output", "on", "stderr;",
                                    "repeat", "the", "flag", "for", "more:", "-v", "info,"]
    assert "-vv debug." in out
    assert "<int>" not in lines["-v,"] and "[default: 0]" not in out
    assert lines["-q,"].split() == ["-q,", "--quiet", "Only", "errors", "on", "stderr."]
    assert lines["--version"].split() == ["--version", "Print", "the", "version", "and", "exit."]


def test_vv_sets_debug_logging(capsys):
    logger = logging.getLogger("batchscope")
    previous = logger.level
    try:
        code, _, _ = _run(capsys, "-vv", "workloads", "--json")
        assert code == 0
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(previous)  # other tests' log capture expects the default


def test_quiet_silences_progress_lines_and_optunas_trial_log(capsys):
    import optuna

    from batchscope.cli.common import configure_logging, err_console

    try:
        configure_logging(-1)
        err_console.print("measuring ...")
        assert capsys.readouterr().err == ""
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR  # no "[I ...] Trial 0"
    finally:
        configure_logging(0)
        optuna.logging.set_verbosity(optuna.logging.INFO)
    err_console.print("measuring ...")
    assert capsys.readouterr().err == "measuring ...\n"
