"""The dashboard: a Textual app that follows a run's `events.jsonl` (live or finished).

`make_app(run_dir, owner=None)` builds it for `tarflow watch` and `tarflow train --ui tui` alike.
A worker thread tails the file (`source.EventTail`) and posts `EventsRead` messages; the app
folds them into a `RunState` on the UI thread and updates the widgets. Nothing in a worker
touches a widget, and nothing on the UI thread reads the disk, except through workers.

`owner`: when the dashboard owns the run (training in this process), an object with
`request_stop()`; `s` and ctrl+c call it. It may also have `attach(app)`, called once the app
is running (to start the training and post `TrainingDone` when it returns): see `training.py`.
"""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.widgets import Footer, Static
from textual.worker import get_current_worker

from .messages import EventsRead, SourceState, TrainingDone
from .source import EventTail, resolve_events_path
from .state import FINAL, RunState
from .widgets.confirm_screen import ConfirmScreen
from .widgets.event_log import EventLog
from .widgets.help_screen import HelpScreen
from .widgets.line_chart import Line, LineChart
from .widgets.run_header import RunHeader
from .widgets.sample_view import SampleView


class Chart(NamedTuple):
    id: str
    title: str
    lines: tuple[Line, ...]
    trim_start: bool  # keep the first tenth of a long run (the initial drop) out of the vertical range


CHARTS = (
    Chart(
        "chart-bpd",
        "bpd",
        (
            Line("bpd", "train", "cyan"),
            Line("eval_bpd", "held-out", "magenta"),  # a variational run's bound
            Line("eval_bpd_uniform", "uniform", "blue", optional=True),  # beside it, with uniform dequantization
        ),
        True,
    ),
    Chart("chart-loss", "loss", (Line("loss", "", "cyan"),), True),
    Chart("chart-lr", "lr", (Line("lr", "", "yellow"),), False),
    Chart("chart-speed", "img/s", (Line("images_per_s", "", "green"),), False),
)


KEYS = [
    Binding("q", "quit_viewer", "quit"),
    Binding("question_mark", "help", "help", key_display="?"),
    Binding("s", "stop_run", "stop"),
    Binding("r", "reload", "reload"),
    Binding("left_square_bracket", "page(-1)", "older", key_display="["),
    Binding("right_square_bracket", "page(1)", "newer", key_display="]"),
    Binding("z", "zoom", "zoom", show=False),
    Binding("ctrl+c", "interrupt", "stop", show=False, priority=True),
]


# below this size the panels would not fit: only the header, a notice and the footer are drawn
MIN_WIDTH, MIN_HEIGHT = 40, 12


def too_small_note(width: int, height: int) -> str:
    """The notice drawn instead of the panels: the longest wording that fits the room between
    the header (2 rows) and the footer, in whole words."""
    rows, cols = max(1, height - 3), max(1, width - 2)  # padding: a column either side
    notes = (
        f"terminal too small ({width}x{height}): the dashboard needs at least {MIN_WIDTH}x{MIN_HEIGHT}",
        f"too small ({width}x{height}): needs {MIN_WIDTH}x{MIN_HEIGHT}",
        f"needs {MIN_WIDTH}x{MIN_HEIGHT}",
    )
    for note in notes:
        if len(textwrap.wrap(note, cols, break_long_words=False)) <= rows:
            return note
    return notes[-1]


def size_classes(width: int, height: int) -> dict[str, bool]:
    """The screen's size classes (see dashboard.tcss) for a terminal of `width` x `height`."""
    return {
        "-wide": width >= 110,
        "-narrow": width < 72,
        "-no-samples": width < 60,
        "-tall": height >= 34,
        "-short": height < 30,
        "-no-log": height < 18,
        "-tiny": width < MIN_WIDTH or height < MIN_HEIGHT,
    }


def sample_note(state: RunState) -> str:
    """What the sample panel says while the run has no sample grid."""
    every = state.sample_every
    if every == 0:
        return "this run makes no sample grids (--sample-every 0)"
    due = None
    if every:
        # grids come at multiples of --sample-every, and at the last step
        due = max(every, -(-state.step // every) * every)
        if state.max_steps and state.step < state.max_steps < due:
            due = state.max_steps
    if state.status in FINAL:
        how = {"finished": "finished", "interrupted": "was interrupted", "failed": "failed"}[state.status]
        at = f" at step {state.step:,}" if state.step else ""
        if state.status == "finished":
            return f"the run finished{at} without a sample grid"
        return f"the run {how}{at}, before its first sample grid" + (f" (due at step {due:,})" if due else "")
    return "no sample grid yet" + (f": the first comes at step {due:,}" if due else "")


class DashboardApp(App[None]):
    CSS_PATH = Path(__file__).with_name("dashboard.tcss")
    TITLE = "tarflow"
    ENABLE_COMMAND_PALETTE = False

    BINDINGS = KEYS

    def __init__(
        self,
        run_dir: str | Path,
        *,
        owner: Any = None,
        poll: float = 0.25,
        clock: Callable[[], float] = time.time,
        tick: float | None = 1.0,
        graphics: str = "halfblock",
    ):
        super().__init__()
        self.graphics = graphics
        self.run_dir, self.events_path = resolve_events_path(run_dir)
        self.owner = owner
        self.poll = poll
        self.clock = clock
        self.tick = tick
        self.state = RunState(self.run_dir)
        self.title = f"tarflow · {self.state.name}"
        self._generation = 0
        self._follow_stop = threading.Event()
        self._taken = threading.Event()  # the UI has taken the last EventsRead
        self._owner_done = False
        self._quit_when_done = False

    # -------------------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with Horizontal(id="body"):
            with Grid(id="charts"):
                for chart in CHARTS:
                    yield LineChart(chart.title, chart.lines, trim_start=chart.trim_start, id=chart.id, classes="chart")
            yield SampleView(id="samples", graphics=self.graphics)
        yield EventLog(id="log")
        yield Static(id="too-small")
        yield Footer()

    def on_mount(self) -> None:
        self._fit(self.size.width, self.size.height)
        self._update(set())
        self._start_follow()
        if self.tick:
            self.set_interval(self.tick, self._on_tick)
        attach = getattr(self.owner, "attach", None)
        if callable(attach):
            attach(self)

    def on_resize(self, event) -> None:
        self._fit(event.size.width, event.size.height)

    def _fit(self, width: int, height: int) -> None:
        """Size classes on the screen (see dashboard.tcss): smaller terminals drop panels rather
        than draw them clipped, and below MIN_WIDTH x MIN_HEIGHT say so instead."""
        classes = size_classes(width, height)
        for name, applies in classes.items():
            self.screen.set_class(applies, name)
        if classes["-tiny"]:
            self.query_one("#too-small", Static).update(too_small_note(width, height))

    def on_unmount(self) -> None:
        self._follow_stop.set()

    # ------------------------------------------------------------------------- reading
    def _start_follow(self) -> None:
        self._follow_stop.set()
        self._follow_stop = threading.Event()
        self._generation += 1
        self._follow(self._generation, self._follow_stop)

    @work(thread=True, group="follow", exit_on_error=False, description="tail events.jsonl")
    def _follow(self, generation: int, stop: threading.Event) -> None:
        """Worker thread: poll the events file and post what is new. Never touches widgets."""
        worker = get_current_worker()
        tail = EventTail(self.events_path, chunk=1 << 19)
        last_state = None
        try:
            while not (stop.is_set() or worker.is_cancelled):
                read = tail.poll()
                if read.state != last_state:
                    last_state = read.state
                    self.post_message(SourceState(generation, read.state))
                if read.events or read.problems or read.reset:
                    # one batch in flight at a time, so keys are never queued behind a backlog
                    self._taken.clear()
                    self.post_message(EventsRead(generation, read.events, read.problems, read.reset, read.problems_at))
                    while not (self._taken.wait(0.1) or stop.is_set() or worker.is_cancelled):
                        pass
                if not read.more:
                    stop.wait(self.poll)
        finally:
            tail.close()

    @on(SourceState)
    def _source_state(self, message: SourceState) -> None:
        if message.generation != self._generation:
            return
        self.state.source_state = message.state
        self._update({"header"})

    @on(EventsRead)
    def _events_read(self, message: EventsRead) -> None:
        try:
            self._take(message)
        finally:
            self._taken.set()

    def _take(self, message: EventsRead) -> None:
        if message.generation != self._generation:
            return
        changed: set[str] = set()
        if message.reset:
            self._clear()
            self.state.note("warning", f"{message.reset}: reading it again from the first line")
            changed |= {"header", "charts", "samples", "log"}
        changed |= self.state.apply_read(message.events, message.problems, message.problems_at)
        self._update(changed)

    def _clear(self) -> None:
        self.state.clear()
        self.query_one(SampleView).reset()
        self.query_one(EventLog).reset()

    # -------------------------------------------------------------------------- drawing
    def _update(self, changed: set[str]) -> None:
        state = self.state
        self.query_one(RunHeader).show(state, self.clock())
        for chart in self.query(LineChart):
            if "charts" in changed or not changed:
                chart.set_data(state.series)
            chart.set_ended(state.status in FINAL)
        view = self.query_one(SampleView)
        view.set_waiting_note(sample_note(state))  # follows the step and the run's end
        if "samples" in changed:
            view.set_grids(state.samples, state.run_dir)
        if "log" in changed:
            self.query_one(EventLog).sync(state.log, state.log_dropped, state.start_time)
        self.title = f"tarflow · {state.name}"

    def _on_tick(self) -> None:
        self.query_one(RunHeader).show(self.state, self.clock())

    # -------------------------------------------------------------------------- owner
    @on(TrainingDone)
    def _training_done(self, message: TrainingDone) -> None:
        self._owner_done = True
        if message.error and not message.started:
            # failed before the run started (bad data, bad settings): nothing to show, so
            # close and let the command report the error
            self.exit()
            return
        if message.error:
            self.state.training_failed(message.error, self.clock)
        self.state.stopping = False
        self._update({"log"})
        self.refresh_bindings()
        if self._quit_when_done:
            self.exit()

    @property
    def owns_run(self) -> bool:
        return self.owner is not None and callable(getattr(self.owner, "request_stop", None))

    @property
    def run_active(self) -> bool:
        """Training in this process has not returned yet."""
        return self.owns_run and not self._owner_done

    # -------------------------------------------------------------------------- actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop_run" and not self.run_active:
            return False  # not in the footer; the key is answered by on_key instead
        return True

    def on_key(self, event) -> None:
        if event.key == "s" and not self.run_active:
            event.stop()
            self.action_stop_run()

    def action_quit_viewer(self) -> None:
        if not self.run_active or self._quit_when_done:
            self.exit()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._quit_when_done = True
                self._request_stop("stopping the run (saving a checkpoint), then quitting; q again quits now")

        self.push_screen(
            ConfirmScreen("The run is training in this process.\nStop it (a checkpoint is saved) and quit?"), answer
        )

    def action_help(self) -> None:
        self.push_screen(HelpScreen(str(self.events_path), self.owns_run))

    def action_stop_run(self) -> None:
        if not self.owns_run and self.state.status in FINAL:
            self.notify(f"The run is not running: it has ended ({self.state.status}).", title="not stopped")
            return
        if not self.owns_run:
            self.notify(
                "This viewer does not own the run: stop it where it runs (ctrl+c in its terminal).",
                title="not stopped",
                severity="warning",
            )
            return
        if not self.run_active:
            self.notify("The run has already ended.")
            return
        self._request_stop("stop requested: saving a checkpoint…")

    def action_interrupt(self) -> None:
        if self.run_active:
            if self.state.stopping or self._quit_when_done:
                self.notify("Already stopping; q quits the viewer now.")
                return
            self._request_stop("ctrl+c: stopping the run and saving a checkpoint…")
        else:
            self.exit()

    def _request_stop(self, note: str) -> None:
        if not self.state.stopping:
            self.owner.request_stop()
            self.state.stopping = True
            self.state.note("info", note)
        self.notify(note)
        self._update({"log"})

    def action_reload(self) -> None:
        self._clear()
        self._update({"header", "charts", "samples", "log"})
        self._start_follow()
        self.notify(f"Reloading {self.events_path.name}")

    def action_page(self, delta: int) -> None:
        self.query_one(SampleView).page(delta)

    def action_zoom(self) -> None:
        mode = self.query_one(SampleView).toggle_mode()
        self.notify("samples: whole grid" if mode == "whole" else "samples: legible detail")


def make_app(run_dir: str | Path, **options: Any) -> DashboardApp:
    """The dashboard for `run_dir` (a run directory, or its events `.jsonl` file).

    `options`, as :class:`DashboardApp` takes them -- `owner`: an object with `request_stop()`
    when this process runs the training (`s` then stops it), else None. `poll`: seconds between
    reads of the file. `graphics`: how sample grids are drawn, `halfblock`, `kitty` or `sixel`
    (resolve `auto` with `graphics.pick_graphics()` before calling). `clock` and `tick` (the
    header's refresh, None for none) are there for tests.
    """
    return DashboardApp(run_dir, **options)
