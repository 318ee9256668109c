"""Self-contained HTML reports and figure files.

A report is one HTML file a user can mail or open offline: figures are inlined as SVG (no
network, no external assets), and every piece of text that came from a run (workload names, error
messages, notes) is HTML-escaped, because a run record is data, not markup.
"""

from __future__ import annotations

import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

# Figures are built with matplotlib.figure.Figure directly (no pyplot), so no GUI backend is
# involved and the user's own matplotlib backend setting is left alone.
import matplotlib
from matplotlib.figure import Figure

from batchscope.atomic import write_bytes_atomic

REPORT_NAME = "report.html"
"""The HTML file a run's report is written to, beside its record, unless told otherwise."""
PLOTS_DIR = "plots"
"""The folder beside the HTML where tune's and the adaptive mode's PNG/SVG plots go."""

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #1d1d1f; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
.wide { overflow-x: auto; }
th, td { border: 1px solid #d0d0d5; padding: .25rem .6rem; text-align: right; }
th { background: #f2f2f5; } td.text, th.text { text-align: left; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1rem; }
figure { margin: 0; border: 1px solid #e4e4e8; border-radius: 6px; padding: .5rem; }
figcaption { font-weight: 600; margin-bottom: .3rem; } figure svg { width: 100%; height: auto; }
ul.notes li { margin: .2rem 0; } .meta { color: #5b5b66; font-size: .85rem; }
"""


def svg_document(figure: Figure) -> str:
    """The figure as an SVG document. No date and a fixed id salt (matplotlib salts element ids
    randomly otherwise), so a record renders to the same bytes."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "batchscope"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def inline_svg(svg: str) -> str:
    """An SVG document as an inline <svg> element (XML prolog and DOCTYPE stripped)."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def figure_to_svg(figure: Figure) -> str:
    """The figure as an inline <svg> element."""
    return inline_svg(svg_document(figure))


@dataclass(frozen=True)
class SavedFigure:
    """A figure written as `<slug>.png` and `<slug>.svg`, with the SVG kept for the report."""

    title: str
    svg: str
    paths: tuple[Path, Path]


def save_figures(out_dir: str | os.PathLike[str],
                 figures: Iterable[tuple[str, Figure]]) -> list[SavedFigure]:
    """Write each figure as `<slug>.png` and `<slug>.svg`. The SVG text comes back too, so the
    HTML report inlines it instead of drawing every figure a third time (drawing is most of a
    report's cost: about a second for four figures)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved: list[SavedFigure] = []
    for title, figure in figures:
        slug = slugify(title)
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=120, bbox_inches="tight")
        svg = svg_document(figure)
        png_path, svg_path = out / f"{slug}.png", out / f"{slug}.svg"
        # Never a half-written plot; not fsynced, since `batchscope report` can redraw it.
        write_bytes_atomic(png_path, png.getvalue(), durable=False)
        write_bytes_atomic(svg_path, svg.encode("utf-8"), durable=False)
        saved.append(SavedFigure(title, svg, (png_path, svg_path)))
    return saved


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """An HTML table from a list of dicts (columns from the first row, then any new keys)."""
    if not rows:
        return "<p class='meta'>(no rows)</p>"
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    head = "".join(f"<th class='{_cell_class(rows[0].get(c))}'>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='{_cell_class(row.get(c))}'>{_esc(_format_cell(row.get(c)))}</td>"
            for c in columns
        )
        + "</tr>"
        for row in rows
    )
    # Wide tables (a sweep's trials) scroll inside their box instead of widening the page.
    return (f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            f"</table></div>")


def write_html_report(
    path: str | os.PathLike[str],
    title: str,
    figures: Sequence[tuple[str, Figure] | SavedFigure],
    tables: Sequence[tuple[str, Sequence[dict[str, Any]]]] = (),
    notes: Sequence[str] = (),
    subtitle: str = "",
) -> Path:
    """Write one self-contained HTML file: title, notes, tables, then the figures (inline SVG;
    a `SavedFigure` is inlined as saved, a matplotlib Figure is drawn here)."""
    from batchscope.record import write_text_atomic

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p class='meta'>{_esc(subtitle)}</p>")
    if notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    for heading, rows in tables:
        parts.append(f"<h2>{_esc(heading)}</h2>{render_table(rows)}")
    if figures:
        parts.append("<h2>Plots</h2><div class='figures'>")
        for item in figures:
            if isinstance(item, SavedFigure):
                caption, svg = item.title, inline_svg(item.svg)
            else:
                caption, svg = item[0], figure_to_svg(item[1])
            parts.append(
                f"<figure id='{slugify(caption)}'><figcaption>{_esc(caption)}</figcaption>"
                f"{svg}</figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>\n")
    return write_text_atomic(path, "".join(parts), durable=False)  # redrawable, as the plots


def slugify(text: str) -> str:
    slug = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug.strip("-") or "figure"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _cell_class(value: Any) -> str:
    return "num" if isinstance(value, (int, float)) and not isinstance(value, bool) else "text"
