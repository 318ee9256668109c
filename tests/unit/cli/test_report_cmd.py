"""`batchscope report`: where the HTML and its plots go, and every unusable path refused in one
line with exit code 2 before anything is drawn."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchscope.cli import report_cmd
from batchscope.cli.main import run
from batchscope.record import RunRecord

# One probe is enough for the report to draw one plot (peak memory vs batch size).
MEMORY = {"probes": [{"batch_size": 8, "fits": True, "peak_bytes": 2**20, "seconds": 0.1}],
          "budget_bytes": 2**30}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        run(list(argv))
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


@pytest.fixture
def saved_run(tmp_path: Path) -> Path:
    record = RunRecord(kind="tune", workload={"name": "w"}, environment={},
                       sections={"memory": MEMORY})
    return record.save(tmp_path / "runs" / "demo" / "run.json")


@pytest.fixture
def no_drawing(monkeypatch):
    monkeypatch.setattr(report_cmd, "_render", lambda *a: pytest.fail("drew before checking"))


def test_html_elsewhere_gets_its_plots_beside_it_and_leaves_the_run_directory_alone(
        capsys, tmp_path, saved_run):
    html = tmp_path / "elsewhere" / "mine.html"
    code, out, err = _run(capsys, "report", str(saved_run), "--html", str(html))
    assert (code, err) == (0, "")
    assert out.strip() == f"report: {html}"
    assert "<figure" in html.read_text()
    assert sorted(p.name for p in (html.parent / "plots").iterdir()) == [
        "peak-memory-vs-batch-size.png", "peak-memory-vs-batch-size.svg"]
    assert sorted(p.name for p in saved_run.parent.iterdir()) == ["run.json"]


def test_default_report_goes_next_to_the_run(capsys, saved_run):
    code, out, _ = _run(capsys, "report", str(saved_run))
    assert code == 0 and out.strip() == f"report: {saved_run.parent / 'report.html'}"
    assert (saved_run.parent / "plots" / "peak-memory-vs-batch-size.svg").is_file()


def test_html_that_is_a_directory_is_refused(capsys, tmp_path, saved_run, no_drawing):
    code, out, err = _run(capsys, "report", str(saved_run), "--html", str(tmp_path))
    assert (code, out) == (2, "")
    assert err == (f"error: --html {str(tmp_path)!r} is a directory; pass a file path such as "
                   f"{str(tmp_path / 'report.html')!r}\n")


def test_a_default_report_path_that_is_a_directory_points_at_html(capsys, saved_run, no_drawing):
    (saved_run.parent / "report.html").mkdir()
    code, _, err = _run(capsys, "report", str(saved_run))
    assert (code, err) == (2, f"error: the report {str(saved_run.parent / 'report.html')!r} is a "
                              f"directory; pass --html PATH to write the report elsewhere\n")


def test_html_under_a_plain_file_is_refused(capsys, tmp_path, saved_run, no_drawing):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = _run(capsys, "report", str(saved_run), "--html", str(blocker / "x.html"))
    assert code == 2
    assert err == (f"error: --html {str(blocker / 'x.html')!r} cannot be written: directory "
                   f"{str(blocker)!r} is not writable (Not a directory); pass a file path in a "
                   f"writable directory\n")
    assert blocker.read_text() == "x"


def test_a_plots_folder_that_is_a_file_is_refused_before_drawing(capsys, tmp_path, saved_run,
                                                                 no_drawing):
    (tmp_path / "plots").write_text("mine")
    code, _, err = _run(capsys, "report", str(saved_run), "--html", str(tmp_path / "r.html"))
    assert code == 2
    assert f"directory {str(tmp_path / 'plots')!r} is not writable (Not a directory)" in err
    assert (tmp_path / "plots").read_text() == "mine" and not (tmp_path / "r.html").exists()


def test_html_that_is_the_run_record_itself_is_refused(capsys, saved_run, no_drawing):
    before = saved_run.read_text()
    code, _, err = _run(capsys, "report", str(saved_run), "--html", str(saved_run))
    assert code == 2
    assert err == (f"error: --html {str(saved_run)!r} is the run record itself; pass another file "
                   f"name such as {str(saved_run.with_name('report.html'))!r}\n")
    assert saved_run.read_text() == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_html_in_a_directory_no_file_can_be_made_in_is_refused(capsys, saved_run, no_drawing):
    code, _, err = _run(capsys, "report", str(saved_run), "--html", "/proc/x.html")
    assert code == 2
    assert err.startswith("error: --html '/proc/x.html' cannot be written: directory '/proc' "
                          "is not writable (")
    assert err.count("\n") == 1


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", None], ids=["binary", "directory"])
def test_a_run_that_is_not_a_readable_json_file_is_one_line(capsys, tmp_path, content):
    target = tmp_path / "run.json"
    if content is None:
        target.mkdir()
    else:
        target.write_bytes(content)
    code, out, err = _run(capsys, "report", str(target))
    assert (code, out) == (2, "")
    assert err.startswith(f"error: run record {str(target)!r} is ") and err.count("\n") == 1
    assert "Traceback" not in err
