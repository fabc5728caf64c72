"""The `?` screen: what the keys do and where the numbers come from."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]tarflow dashboard[/b]

[b]q[/b]        {quit_note}
[b]?[/b]        this help (any key closes it)
[b]s[/b]        {stop_note}
[b]ctrl+c[/b]   {ctrl_c}
[b]r[/b]        reload: read events.jsonl again from the first line
[b]\\[ ][/b]      older / newer sample grid
[b]z[/b]        samples: legible detail, or the whole grid shrunk

Charts: train and held-out bpd, loss, learning rate, images/s
against step; the latest values are in their titles (held-out
bpd on the bottom edge when the chart is narrow).

Following {events}
"""


# the keys alone, for terminals too small for the whole help (it would be cut off below `s`)
SHORT = """\
[b]q[/b]  {quit_note}
[b]?[/b]  help (any key closes it)
[b]s[/b]  {stop_note}
[b]ctrl+c[/b]  {ctrl_c}
[b]r[/b]  reload events.jsonl
[b]\\[ ][/b]  older / newer grid
[b]z[/b]  sample zoom"""


class HelpScreen(ModalScreen[None]):
    def __init__(self, events_path: str, owns_run: bool):
        super().__init__()
        self.events_path = events_path
        self.owns_run = owns_run

    def compose(self) -> ComposeResult:
        self.full_text = HELP.format(
            quit_note="quit (a running training is stopped and checkpointed first)"
            if self.owns_run
            else "quit the viewer (the run keeps going)",
            stop_note="stop the run and save a checkpoint"
            if self.owns_run
            else "stop and checkpoint: only in train --ui tui",
            ctrl_c="like s" if self.owns_run else "quit the viewer",
            events=self.events_path.replace("[", "\\["),
        )
        self.short_text = SHORT.format(
            quit_note="quit (stops the run first)" if self.owns_run else "quit (the run keeps going)",
            stop_note="stop, save a checkpoint" if self.owns_run else "stop: only in train --ui tui",
            ctrl_c="like s" if self.owns_run else "quit",
        )
        with Vertical(id="help-box"):
            yield Static(self.full_text, id="help-text")

    def on_mount(self) -> None:
        self._fit()

    def on_resize(self, event) -> None:
        self._fit()

    def _fit(self) -> None:
        """The whole help where it fits (box: 74 columns at most, 95% of the screen, thick
        border, padding 1 2); else the keys alone, with less padding, so none is cut off."""
        width, height = self.app.size
        box_w = min(74, int(width * 0.95))
        rows = len(Text.from_markup(self.full_text).wrap(self.app.console, max(1, box_w - 6)))
        short = rows + 4 > int(height * 0.95)
        box = self.query_one("#help-box")
        box.styles.padding = (0, 1) if short else (1, 2)
        self.query_one("#help-text", Static).update(self.short_text if short else self.full_text)

    def on_key(self, event) -> None:
        event.stop()
        self.dismiss(None)
