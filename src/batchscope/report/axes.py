"""The batch-size axis every batchscope plot shares.

Batch sizes span several powers of two, so the axis is logarithmic in base 2. Matplotlib would
label it `2^10`, `2^12`, ... through its TeX-like mathtext parser; plain numbers read better for
a batch size, and parsing dozens of those labels was about half the time a report took to draw.
"""

from __future__ import annotations

from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, NullLocator

# From here on, multiples of 1024 are labelled "16k", "32k", ... (the usual way to write large
# batch sizes) so that a dozen labels still fit side by side; likewise "16M" for multiples of
# 1024^2 (tiny models probe batches of millions, where "16384k" ran into its neighbours).
_SHORT_FROM = 16384
_MEGA = 1024 * 1024


def batch_size_label(value: float, _position: object = None) -> str:
    """A tick label for a batch size: `512`, `45000`, `32k` (= 32768), `16M`, `0.5`."""
    if value >= 16 * _MEGA and float(value).is_integer() and int(value) % _MEGA == 0:
        return f"{int(value) // _MEGA}M"
    if value >= _SHORT_FROM and float(value).is_integer() and int(value) % 1024 == 0:
        return f"{int(value) // 1024}k"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:g}"


def batch_size_axis(ax: Axes, sizes: Sequence[int] = (), label: str = "batch size") -> None:
    """Make `ax`'s x axis a base-2 log axis of batch sizes with plain labels; with `sizes`,
    ticks sit at those sizes only (e.g. the batch sizes a sweep trained)."""
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sorted(set(sizes)))
    ax.xaxis.set_major_formatter(FuncFormatter(batch_size_label))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, which="both")
