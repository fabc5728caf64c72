"""The `?` screen: what the keys do and where the numbers come from."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]tarflow dashboard[/b]

[b]q[/b]        quit the viewer{quit_note}
[b]?[/b]        this help (any key closes it)
[b]s[/b]        stop the run and save a checkpoint{stop_note}
[b]r[/b]        reload: read events.jsonl again from the first line
[b][[/b] / [b]][/b]    page back / forward through the sample grids
[b]z[/b]        sample zoom: legible detail, or the whole grid shrunk
{ctrl_c}
Charts: train bpd and held-out bpd, training loss, learning rate
and images/s, against step. The first tenth of a long run is left
out of the vertical range; the border shows the latest values.

Following [i]{events}[/i]
"""


class HelpScreen(ModalScreen[None]):
    def __init__(self, events_path: str, owns_run: bool):
        super().__init__()
        self.events_path = events_path
        self.owns_run = owns_run

    def compose(self) -> ComposeResult:
        text = HELP.format(
            quit_note=" (the run stops first: it runs in this process)" if self.owns_run
            else " (a run in another process keeps going)",
            stop_note="" if self.owns_run else "\n         (only when this dashboard started the run)",
            ctrl_c="[b]ctrl+c[/b]   like s\n" if self.owns_run else "[b]ctrl+c[/b]   quit the viewer\n",
            events=self.events_path.replace("[", r"\["),
        )
        with Vertical(id="help-box"):
            yield Static(text, id="help-text")

    def on_key(self, event) -> None:
        event.stop()
        self.dismiss(None)
