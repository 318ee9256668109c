"""The HTML report is self-contained and escapes everything that came from a run."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from batchscope.report.html import inline_svg, save_figures, svg_document, write_html_report


def _figure():
    figure = Figure()
    figure.add_subplot().plot([1, 2, 3], [3, 1, 2])
    return figure


def test_report_inlines_svg_and_escapes_text(tmp_path):
    hostile = "<script>alert('x')</script>"
    path = write_html_report(
        tmp_path / "report.html", title=f"run {hostile}", figures=[(f"plot {hostile}", _figure())],
        tables=[("table", [{"name": hostile, "value": 1.5}])], notes=[hostile],
    )
    text = path.read_text()
    assert "<script>" not in text
    assert text.count("&lt;script&gt;") >= 4
    assert "<svg" in text
    # No external assets: nothing is fetched when the file is opened offline.
    for fetching in ("src=\"http", "src='http", "href=\"http", "href='http", "<link", "@import", "<script"):
        assert fetching not in text


def test_save_figures_writes_png_and_svg(tmp_path):
    saved = save_figures(tmp_path, [("Peak memory vs batch size", _figure())])
    png, svg = saved[0].paths
    assert (png.name, svg.name) == ("peak-memory-vs-batch-size.png", "peak-memory-vs-batch-size.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.read_text() == saved[0].svg and saved[0].svg.lstrip().startswith("<?xml")
    # Same figure, same bytes (no date, fixed id salt).
    assert svg_document(_figure()) == saved[0].svg


def test_the_report_inlines_the_saved_svg_without_drawing_again(tmp_path, monkeypatch):
    saved = save_figures(tmp_path, [("Peak memory vs batch size", _figure())])
    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: pytest.fail("drew the figure again"))
    html = write_html_report(tmp_path / "r.html", "t", saved).read_text()
    assert inline_svg(saved[0].svg) in html and html.count("<svg") == 1
