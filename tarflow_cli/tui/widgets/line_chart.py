"""A line chart drawn with braille dots (2x4 per cell): one or more series against step.

The latest values go in the border title, the step range in the subtitle, so every content row
is plot. Points are averaged per horizontal dot and joined with straight lines; the first tenth
of a long run (the initial drop of a loss) is left out of the vertical range so the rest stays
readable, and values outside the range are drawn at its edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.widget import Widget

_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [dy][dx]


@dataclass(frozen=True)
class Line:
    key: str  # series name in the data mapping
    label: str  # legend text ("" to show the value alone)
    color: str
    optional: bool = False  # in the legend only once it has data (a series only some runs have)


def fmt_num(v: float | None, digits: int = 3) -> str:
    """Compact, fixed-ish width: 2.314 -> 2.31, 8 -> 8.00, 0.0021 -> 2.1e-3, 15342 -> 15.3k
    (`digits` significant digits, 2 for the small ones)."""
    if v is None or not math.isfinite(v):
        return "–"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6:
        return f"{v / 1e6:.{digits}g}M"
    if a >= 1e4:
        return f"{v / 1e3:.{digits}g}k"
    if a >= 100 and digits <= 3:
        return f"{v:.0f}"
    if a >= 0.01:
        return f"{v:#.{digits}g}".rstrip(".")  # keep trailing zeros: 8.00, 0.300
    m, e = f"{v:.{max(1, digits - 2)}e}".split("e")
    return f"{m}e{int(e)}"


def axis_labels(values: list[float]) -> list[str]:
    """Labels for axis ticks, with as many digits as it takes to tell them apart."""
    for digits in range(3, 8):
        labels = [fmt_num(v, digits) for v in values]
        if len(set(labels)) == len(set(values)):
            return labels
    return labels


def fmt_step(s: float) -> str:
    s = int(s)
    return f"{s / 1000:.3g}k" if s >= 100_000 else f"{s:,}"


class LineChart(Widget):
    """Series against step; call `set_data` with a mapping key -> object with .steps/.values."""

    DEFAULT_CSS = """
    LineChart { height: 1fr; width: 1fr; }
    """

    def __init__(
        self,
        title: str,
        lines: Sequence[Line],
        *,
        trim_start: bool = True,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ):
        super().__init__(name=name, id=id, classes=classes)
        self.chart_title = title
        self.lines = tuple(lines)
        self.trim_start = trim_start
        self._data: Mapping[str, object] = {}
        self._ended = False  # the run has ended: no data is coming any more
        self._version = 0
        self._cache: tuple[tuple, Text] | None = None
        self.border_title = title

    # ----------------------------------------------------------------------------- data
    def set_data(self, data: Mapping[str, object]) -> None:
        self._data = data
        self._version += 1
        self._update_titles()
        self.refresh()

    def set_ended(self, ended: bool) -> None:
        """Whether the run has ended (an empty chart then says "no data", not "waiting for data")."""
        if ended != self._ended:
            self._ended = ended
            self._version += 1
            self.refresh()

    def _series(self, key: str) -> tuple[Sequence[float], Sequence[float]]:
        s = self._data.get(key)
        if s is None:
            return (), ()
        return s.steps, s.values  # type: ignore[attr-defined]

    def _update_titles(self) -> None:
        """Latest values in the title, the step range in the subtitle. When that title does not
        fit the border, the legend is split: the first line's value stays in the title and the
        others go to the subtitle (then without labels; last, the values all go to the subtitle)."""
        parts, bare = [], []
        for ln in self.lines:
            _, values = self._series(ln.key)
            if ln.optional and not len(values):
                continue
            value = fmt_num(values[-1]) if len(values) else "–"
            label = f"{ln.label} " if ln.label else ""
            parts.append(f"[{ln.color}]━[/] {label}{value}")
            bare.append(f"[{ln.color}]━[/] {value}")
        lo, hi = self._x_range()
        steps = f"step {fmt_step(lo)}–{fmt_step(hi)}" if hi > lo else ""
        name = self.chart_title
        candidates = [(f"{name} " + "  ".join(parts), steps)]
        if len(parts) > 1:
            rest = "  ".join(parts[1:])
            candidates += [
                (f"{name} {parts[0]}", f"{rest}  {steps}" if steps else rest),
                (f"{name} {parts[0]}", rest),
                (f"{name} " + " ".join(bare), steps),
            ]
            rest_bare = " ".join(bare[1:])
            candidates += [
                (f"{name} {bare[0]}", f"{rest_bare}  {steps}" if steps else rest_bare),
                (f"{name} {bare[0]}", rest_bare),
            ]
        else:
            candidates.append((candidates[0][0], ""))  # the step range is the first to go
        # last: the name alone in the title, the values on the bottom edge
        candidates.append((name, " ".join(bare)))
        room = self.outer_size.width - 6  # corners, a rule and a space either side
        title, subtitle = candidates[0]
        if self.outer_size.width:
            for t, sub in candidates:
                if _cells(t) <= room and _cells(sub) <= room:
                    title, subtitle = t, sub
                    break
        self.border_title = title
        self.border_subtitle = subtitle

    def on_resize(self, event) -> None:
        self._update_titles()

    def _x_range(self) -> tuple[float, float]:
        lo, hi = math.inf, -math.inf
        for ln in self.lines:
            steps, _ = self._series(ln.key)
            if len(steps):
                lo, hi = min(lo, steps[0]), max(hi, steps[-1])
        return (0.0, 0.0) if lo == math.inf else (lo, hi)

    def _y_range(self, x_lo: float, x_hi: float) -> tuple[float, float] | None:
        cut = x_lo + 0.1 * (x_hi - x_lo)
        lo, hi = math.inf, -math.inf
        for ln in self.lines:
            steps, values = self._arrays(ln.key)
            if not len(values):
                continue
            kept = values[steps >= cut] if self.trim_start and len(values) >= 20 else values
            if not len(kept):
                kept = values
            lo, hi = min(lo, float(kept.min())), max(hi, float(kept.max()))
        if lo == math.inf:
            return None
        if hi - lo < 1e-12 * max(1.0, abs(hi)):
            pad = abs(hi) * 0.05 or 1.0
            return lo - pad, hi + pad
        pad = (hi - lo) * 0.04
        return (max(0.0, lo - pad) if lo >= 0 else lo - pad), hi + pad  # no negative axis for lr, img/s

    def _arrays(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The series as float arrays (`.arrays()` when the series has it, as records.Series does)."""
        s = self._data.get(key)
        if s is None:
            return np.empty(0), np.empty(0)
        if hasattr(s, "arrays"):
            return s.arrays()
        return np.asarray(s.steps, dtype=np.float64), np.asarray(s.values, dtype=np.float64)

    # --------------------------------------------------------------------------- render
    def render(self) -> Text:
        w, h = self.content_size.width, self.content_size.height
        key = (self._version, w, h)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        text = self._draw(w, h)
        self._cache = (key, text)
        return text

    def _draw(self, w: int, h: int) -> Text:
        if w < 4 or h < 1:
            return Text("")
        x_lo, x_hi = self._x_range()
        y_range = self._y_range(x_lo, x_hi)
        if y_range is None:
            msg = "no data" if self._ended else "waiting for data"
            pad = max(0, (w - len(msg)) // 2)
            lines = [""] * (h // 2) + [" " * pad + msg]
            return Text("\n".join(lines), style="dim", no_wrap=True, overflow="crop")
        y_lo, y_hi = y_range
        rows = [0, (h - 1) // 2, h - 1] if h >= 7 else ([0, h - 1] if h >= 2 else [0])
        # measured up from the bottom, so the bottom tick is y_lo exactly (0, not -1.1e-13)
        ticks = [y_lo + (y_hi - y_lo) * (h - 1 - r) / max(1, h - 1) for r in rows]
        labels = dict(zip(rows, axis_labels(ticks)))
        lw = max(len(s) for s in labels.values()) + 1
        pw = w - lw - 1  # plot width in cells (one column for the axis)
        if pw < 2:
            lw, pw, labels = 0, w - 1, {}
        canvas = _Canvas(pw, h)
        for idx, ln in enumerate(self.lines):
            steps, values = self._arrays(ln.key)
            if len(steps):
                cols, ys = _mean_dots(steps, values, (x_lo, x_hi), y_range, canvas.dots_w, canvas.dots_h)
                canvas.polyline(cols, ys, idx)
        return canvas.text([Style.parse(ln.color) for ln in self.lines], labels, lw)


def _mean_dots(
    steps: np.ndarray,
    values: np.ndarray,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    dots_w: int,
    dots_h: int,
) -> tuple[list[int], list[int]]:
    """The dots of one series: the points that land on the same horizontal dot averaged, as
    (columns, rows) of dots, left to right."""
    (x_lo, x_hi), (y_lo, y_hi) = x_range, y_range
    if x_hi > x_lo:
        xs = np.rint((steps - x_lo) / (x_hi - x_lo) * (dots_w - 1)).astype(np.int64)
    else:
        xs = np.full(len(steps), dots_w - 1, dtype=np.int64)
    xs = np.clip(xs, 0, dots_w - 1)
    counts = np.bincount(xs, minlength=dots_w)
    sums = np.bincount(xs, weights=values, minlength=dots_w)
    cols = np.nonzero(counts)[0]
    means = sums[cols] / counts[cols]
    # rounded: float noise in the means must not move equal values to different dots
    # (a constant series lies exactly half-way between two dots of its centred range)
    frac = np.clip(np.round((means - y_lo) / (y_hi - y_lo), 9), 0.0, 1.0)
    ys = np.rint((1.0 - frac) * (dots_h - 1)).astype(np.int64)
    return cols.tolist(), ys.tolist()


class _Canvas:
    """Braille cells, `width` x `height`, each 2x4 dots; a cell takes the colour of the line
    that drew its last dot."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.dots_w, self.dots_h = width * 2, height * 4
        self.bits = [[0] * width for _ in range(height)]
        self.owner = [[-1] * width for _ in range(height)]

    def plot(self, x: int, y: int, idx: int) -> None:
        if 0 <= x < self.dots_w and 0 <= y < self.dots_h:
            cy, cx = y >> 2, x >> 1
            self.bits[cy][cx] |= _BITS[y & 3][x & 1]
            self.owner[cy][cx] = idx

    def polyline(self, xs: list[int], ys: list[int], idx: int) -> None:
        """The dots joined by straight lines (a lone dot for a single point)."""
        prev = None
        for x, y in zip(xs, ys):
            if prev is None:
                self.plot(x, y, idx)
            else:
                _line(prev[0], prev[1], x, y, lambda a, b: self.plot(a, b, idx))
            prev = (x, y)

    def text(self, styles: list[Style], labels: dict[int, str], label_width: int) -> Text:
        """The cells as text: the axis (with `labels` by row when `label_width`), then each row's
        cells in runs of one style."""
        out = Text(no_wrap=True, overflow="crop")
        axis_style = Style(dim=True)
        for row in range(self.height):
            if label_width:
                label = labels.get(row, "")
                out.append(label.rjust(label_width - 1) + " ", axis_style)
                out.append("┤" if row in labels else "│", axis_style)
            else:
                out.append("│", axis_style)
            run_style: Style | None = None
            run = []
            for col in range(self.width):
                b = self.bits[row][col]
                ch = chr(0x2800 + b) if b else " "
                st = styles[self.owner[row][col]] if b else None
                if st is not run_style and run:
                    out.append("".join(run), run_style)
                    run = []
                run_style = st
                run.append(ch)
            if run:
                out.append("".join(run), run_style)
            if row < self.height - 1:
                out.append("\n")
        return out


def _cells(markup: str) -> int:
    return Text.from_markup(markup).cell_len


def _line(x0: int, y0: int, x1: int, y1: int, plot) -> None:
    """Bresenham, both ends included."""
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        plot(x0, y0)
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy
