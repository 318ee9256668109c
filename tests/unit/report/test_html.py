"""The HTML report is self-contained and escapes everything that came from a run."""

from __future__ import annotations

import re

import pytest
from matplotlib.figure import Figure

from batchscope.report.axes import batch_size_axis, batch_size_label
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


@pytest.mark.parametrize(("value", "label"), [(8, "8"), (512, "512"), (4096, "4096"),
                                              (16384, "16k"), (65536, "64k"), (45000, "45000"),
                                              (8 * 2**20, "8192k"), (16 * 2**20, "16M"),
                                              (2**27, "128M"),
                                              (20000, "20000"), (0.5, "0.5")])
def test_batch_size_labels_are_plain_numbers(value, label):
    assert batch_size_label(value) == label


def test_batch_size_axes_draw_without_mathtext(monkeypatch):
    # Mathtext labels ("2^10") were about half of a report's drawing time.
    import matplotlib.mathtext

    def no_mathtext(*args, **kwargs):
        raise AssertionError("mathtext was used")

    monkeypatch.setattr(matplotlib.mathtext.MathTextParser, "parse", no_mathtext)

    def figure_with(axis_setup):
        figure = Figure()
        ax = figure.add_subplot()
        ax.plot([8, 512, 45000], [1, 2, 3])
        axis_setup(ax)
        return figure, ax

    default, _ = figure_with(lambda ax: ax.set_xscale("log", base=2))
    with pytest.raises(AssertionError, match="mathtext was used"):  # the guard can fail
        svg_document(default)
    ours, ax = figure_with(batch_size_axis)
    assert "batch size" in svg_document(ours)
    labels = [label.get_text() for label in ax.get_xticklabels()]
    assert "16k" in labels and all(re.fullmatch(r"\d+k?", label) for label in labels), labels


def _memory_legend(**memory):
    from batchscope.report.tune_plots import memory_figure

    probes = [{"batch_size": 8, "fits": True, "peak_bytes": 2**20},
              {"batch_size": 500, "fits": True, "peak_bytes": 2**27}]
    figure = memory_figure({"probes": probes, "budget_bytes": 2**31, **memory})
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_the_memory_plot_names_a_bound_that_set_the_limit():
    at_bound = _memory_legend(max_batch_size=500, recommended_batch_size=500, recommended_is_bound=True,
                              capped_by="batch giving 10 steps an epoch")
    assert "limit (batch giving 10 steps an epoch)" in at_bound
    with_margin = _memory_legend(max_batch_size=500, recommended_batch_size=448, capped_by=None)
    assert "recommended (with margin)" in with_margin
