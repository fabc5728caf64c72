"""Two lines at the top: status, run name, step and progress; time, ETA, device and memory.

Each stays on its row: what does not fit the width is left out (the end reason is shortened)."""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text
from textual.widget import Widget

from ..state import RunState, format_duration
from .line_chart import fmt_num

STATUS_STYLE = {
    "waiting": "bold black on grey70",
    "running": "bold black on green",
    "stopping": "bold black on yellow",
    "finished": "bold white on blue",
    "interrupted": "bold black on yellow",
    "failed": "bold white on red",
}


def progress_bar(fraction: float, width: int) -> Text:
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    half = fraction * width - full >= 0.5
    bar = Text("━" * full, style="green")
    if full < width:
        bar.append("╸" if half else "", style="green")
        bar.append("━" * (width - full - (1 if half else 0)), style="grey37")
    return bar


class RunHeader(Widget):
    DEFAULT_CSS = """
    RunHeader { height: 2; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._lines: tuple[Text, Text] = (Text(""), Text(""))
        self._last: tuple[RunState, float, float] | None = None  # show's arguments

    def on_resize(self, event) -> None:
        if self._last is not None:  # what fits depends on the width
            state, now, quiet_after = self._last
            self.show(state, now, quiet_after=quiet_after)

    def show(self, state: RunState, now: float, *, quiet_after: float = 120.0) -> None:
        """Recompute from `state` at time `now` (unix seconds)."""
        self._last = (state, now, quiet_after)
        one = _status_line(state)
        if state.status == "waiting":
            self._lines = (one, _waiting_line(state))
        else:
            width = self.size.width
            _add_progress(one, state, width)
            self._lines = (one, _details_line(state, now, quiet_after, width))
        self.refresh()

    def render(self) -> Text:
        # one row each, cut short with an ellipsis: a long first line must not wrap onto the second
        return Text("\n", no_wrap=True, overflow="ellipsis").join(self._lines)


def _status_line(state: RunState) -> Text:
    """The first line's start: the status badge and the run name."""
    status = "stopping" if state.stopping and state.status == "running" else state.status
    label = {"waiting": "WAITING"}.get(status, status.upper())
    one = Text(no_wrap=True, overflow="ellipsis")
    one.append(f" {label} ", style=STATUS_STYLE.get(status, "reverse"))
    one.append(" ")
    one.append(state.name, style="bold")
    return one


def _waiting_line(state: RunState) -> Text:
    """The second line before the first event: what the viewer is waiting for."""
    two = Text(no_wrap=True, overflow="ellipsis")
    if state.source_state == "missing-dir":
        two.append(f"{state.run_dir} does not exist yet: waiting for the run to start", style="yellow")
    elif state.source_state == "missing-file":
        two.append(f"no events.jsonl in {state.run_dir} yet: waiting for the run to start", style="yellow")
    else:
        two.append("waiting for the first event in events.jsonl", style="dim")
    return two


def _add_progress(one: Text, state: RunState, width: int) -> None:
    """Step, epoch and progress bar after the run name, as far as `width` allows (0: any)."""
    one.append("  step ", style="dim")
    one.append(f"{state.step:,}", style="bold")
    if state.max_steps:
        one.append(f"/{state.max_steps:,}", style="dim")
    frac = state.step / state.max_steps if state.max_steps else None
    percent = f" {frac * 100:3.0f}%" if frac is not None else ""
    if state.epoch is not None:
        epoch = f"{state.epoch:.1f}" if state.epoch < 100 else f"{state.epoch:.0f}"
        if not width or one.cell_len + 8 + len(epoch) + len(percent) <= width:  # else left out
            one.append("  epoch ", style="dim")
            one.append(epoch)
    if frac is not None:
        room = width - one.cell_len - 7
        if room >= 8:
            one.append("  ")
            one.append_text(progress_bar(frac, min(room, 40)))
        one.append(percent, style="dim")


def _details_line(state: RunState, now: float, quiet_after: float, width: int) -> Text:
    """The second line of a started run: times, device, memory, then what the charts also show."""
    two = Text(no_wrap=True, overflow="ellipsis")

    def part(key: str, value: str, style: str = "", cut: bool = False) -> None:
        """Add `key value`; one that does not fit is left out (`cut`: shortened instead)."""
        sep = "  " if two.cell_len else ""
        if width and not cut and two.cell_len + len(sep) + cell_len(f"{key} {value}") > width:
            return
        two.append(sep)
        two.append(f"{key} ", style="dim")
        two.append(value, style=style)

    elapsed = format_duration(state.elapsed(now))
    if state.earlier_sessions:  # resumed: the run's total, then this session's
        elapsed += f" ({format_duration(state.session_elapsed(now))} this session)"
    part("elapsed", elapsed)
    if state.warnings:  # before the end reason, which is cut to the width and leaves no room
        part("warnings", str(state.warnings), "yellow")
    if state.status in ("interrupted", "failed") and state.end_reason:
        part("reason", state.end_reason, "bold red" if state.status == "failed" else "yellow", cut=True)
    if state.status == "running":
        eta = state.eta(now)
        part("ETA", format_duration(eta) if eta is not None else "–")
        quiet = _quiet_for(state, now)
        if quiet is not None and quiet > quiet_after:
            part("quiet", format_duration(quiet), "bold yellow")
    if state.device:
        part("device", state.device)
    if state.batch:
        part("batch", state.batch)
    if state.memory:
        part("mem", state.memory)
    # the rest is also in the charts' titles: first to go when the line is short
    loss = state.latest.get("loss")
    if loss is not None:
        part("loss", fmt_num(loss))
    rate = state.latest.get("images_per_s")
    if rate is not None:
        part("img/s", fmt_num(rate))
    if state.params:
        part("params", fmt_num(float(state.params)))
    return two


def _quiet_for(state: RunState, now: float) -> float | None:
    """Seconds since the last event while the run is said to be running."""
    if state.status != "running" or state.last_time is None:
        return None
    return max(0.0, now - state.last_time)
