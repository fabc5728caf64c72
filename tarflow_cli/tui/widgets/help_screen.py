"""The `?` screen: what the keys do and where the numbers come from."""

from __future__ import annotations

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


class HelpScreen(ModalScreen[None]):
    def __init__(self, events_path: str, owns_run: bool):
        super().__init__()
        self.events_path = events_path
        self.owns_run = owns_run

    def compose(self) -> ComposeResult:
        text = HELP.format(
            quit_note="quit (a running training is stopped and checkpointed first)" if self.owns_run
            else "quit the viewer (the run keeps going)",
            stop_note="stop the run and save a checkpoint" if self.owns_run
            else "stop and checkpoint: only in train --ui tui",
            ctrl_c="like s" if self.owns_run else "quit the viewer",
            events=self.events_path.replace("[", "\\["),
        )
        with Vertical(id="help-box"):
            yield Static(text, id="help-text")

    def on_key(self, event) -> None:
        event.stop()
        self.dismiss(None)
