"""The log panel: run start/resume, checkpoints, warnings, the end reason, and the viewer's notes.

Each line is `step  mark  text`, the text wrapped under itself; everything is written again at
the new width when the panel is resized.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import RichLog

from ..records import LogLine
from ..state import format_duration

LEVEL_STYLE = {"warning": "yellow", "error": "bold red", "event": "", "info": "dim"}
LEVEL_MARK = {"warning": "!", "error": "✗", "event": "·", "info": " "}


def format_line(line: LogLine, start_time: float | None) -> Table:
    if line.step is not None:
        when = f"{line.step:,}"
    elif line.time is not None and start_time is not None:
        when = "+" + format_duration(line.time - start_time)
    else:
        when = ""
    style = LEVEL_STYLE.get(line.level, "")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=7, justify="right", style="dim", no_wrap=True)
    grid.add_column(width=1, no_wrap=True)
    grid.add_column(ratio=1, overflow="fold")
    grid.add_row(when, Text(LEVEL_MARK.get(line.level, " "), style=style), Text(line.text, style=style))
    return grid


class EventLog(RichLog):
    DEFAULT_CSS = """
    EventLog { height: 6; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(
            id=id,
            classes=classes,
            wrap=True,
            markup=False,
            highlight=False,
            max_lines=2000,
            auto_scroll=True,
            min_width=1,
        )
        self.shown = 0  # lines of the state's log already written (counting trimmed ones)
        self._lines: list[LogLine] = []
        self._start: float | None = None
        self._width = 0
        self.border_title = "log"

    def sync(self, lines: list[LogLine], dropped: int, start_time: float | None) -> None:
        """Write the lines not shown yet; `dropped` lines were trimmed off the front of `lines`."""
        total = dropped + len(lines)
        if self.shown > total:
            self.reset()
        new = lines[max(0, self.shown - dropped) :]
        self._lines = (self._lines + new)[-500:]
        self._start = start_time
        self.shown = total
        width = self._text_width()
        if width <= 0:
            self._width = 0  # hidden or not laid out yet: all written again once it has a size (on_resize)
            return
        for line in new:
            self.write(format_line(line, start_time), width=width)

    def _text_width(self) -> int:
        """Content width, less a column for the scroll bar until it shows."""
        return self.scrollable_content_region.width - (0 if self.show_vertical_scrollbar else 1)

    def on_resize(self, event) -> None:
        width = self._text_width()
        if width <= 0 or width == self._width:
            return
        self._width = width
        super().clear()
        for line in self._lines:
            self.write(format_line(line, self._start), width=width)

    def reset(self) -> None:
        super().clear()
        self._lines = []
        self.shown = 0
