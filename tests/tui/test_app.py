"""The dashboard driven by a Pilot over canned events.jsonl files."""

from __future__ import annotations

import json

from tarflow_cli.tui.app import make_app
from tarflow_cli.tui.messages import TrainingDone
from tarflow_cli.tui.widgets.confirm_screen import ConfirmScreen
from tarflow_cli.tui.widgets.help_screen import HelpScreen
from tarflow_cli.tui.widgets.line_chart import LineChart, fmt_num
from tarflow_cli.tui.widgets.sample_view import SampleView

from .canned import T0, append, make_run, start_event, train_event, write_grid
from .helpers import header_text, log_text, run_async, screen_text, wait_until


def app_for(run, **kw):
    return make_app(run, poll=0.02, clock=lambda: T0 + 40.0, tick=None, **kw)


class FakeOwner:
    def __init__(self):
        self.stops = 0

    def request_stop(self):
        self.stops += 1


@run_async
async def test_values_appear_and_follow_appends(tmp_path):
    run = make_run(tmp_path, steps=300, finished=False)
    app = app_for(run)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 300, what="step 300")
        head = header_text(app)
        assert "RUNNING" in head and "tiny-demo" in head and "step 300/1,000" in head
        assert "device cpu" in head and "mem 512.0 MiB" in head and "ETA" in head
        bpd = app.query_one("#chart-bpd", LineChart)
        assert f"train {fmt_num(train_event(300)['bpd'])}" in str(bpd.border_title)
        # the legend: in the title, or its second line in the subtitle when the chart is narrow
        assert "held-out 3.57" in str(bpd.border_title) + str(bpd.border_subtitle)
        assert "non-finite loss at step 300" in log_text(app)
        view = app.query_one(SampleView)
        await wait_until(
            pilot, lambda: view.current is not None and view.current.path in view._images, what="sample grid"
        )
        assert "step 200" in str(view.border_title)

        append(run, train_event(310), {"time": T0 + 16, "kind": "eval", "step": 310, "bpd": 2.5})
        await wait_until(pilot, lambda: app.state.step == 310, what="appended step")
        assert "held-out 2.5" in str(bpd.border_title) + str(bpd.border_subtitle)
        assert "step 310/1,000" in header_text(app)

        append(run, {"time": T0 + 17, "kind": "end", "step": 310, "status": "failed", "reason": "out of memory"})
        await wait_until(pilot, lambda: app.state.status == "failed", what="end event")
        assert "FAILED" in header_text(app) and "out of memory" in header_text(app)
        assert "run failed: out of memory" in log_text(app)
        # the run has ended: the viewer stays open and keeps the final state
        await pilot.pause(0.1)
        assert app.is_running and "FAILED" in header_text(app)


@run_async
async def test_half_written_and_malformed_lines(tmp_path):
    run = make_run(tmp_path, steps=50, extra=["{oops", "[1,2,3]"])
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "not valid JSON" in log_text(app), what="warning")
        assert "expected a JSON object" in log_text(app)
        assert app.state.warnings >= 2 and app.is_running
        line = json.dumps(train_event(60))
        append(run, line[:25], newline=False)
        await pilot.pause(0.15)
        assert app.state.step == 50
        append(run, line[25:])
        await wait_until(pilot, lambda: app.state.step == 60, what="completed line")


@run_async
async def test_run_dir_that_does_not_exist_yet(tmp_path):
    run = tmp_path / "later"
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "does not exist yet" in header_text(app), what="waiting note")
        assert "WAITING" in header_text(app)
        run.mkdir()
        await wait_until(pilot, lambda: "no events.jsonl" in header_text(app), what="missing file note")
        append(run, start_event(), train_event(10))
        await wait_until(pilot, lambda: app.state.step == 10, what="events")
        assert "RUNNING" in header_text(app)


@run_async
async def test_truncated_file_is_read_again(tmp_path):
    run = make_run(tmp_path, steps=200)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 200, what="first read")
        with open(run / "events.jsonl", "r+") as f:
            f.truncate(0)
            f.write(json.dumps(start_event()) + "\n" + json.dumps(train_event(20)) + "\n")
        await wait_until(pilot, lambda: app.state.step == 20, what="re-read")
        assert "truncated" in log_text(app)
        assert app.state.series["bpd"].steps == [20]


@run_async
async def test_keys(tmp_path):
    run = make_run(tmp_path, steps=600, finished=True)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.status == "finished", what="finished")
        view = app.query_one(SampleView)
        assert len(view.grids) == 3 and view.position == 2

        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "only in train --ui tui" in screen_text(app)
        await pilot.press("x")
        assert not isinstance(app.screen, HelpScreen)

        await pilot.press("s")
        await pilot.pause()
        said = [n.message for n in app._notifications]
        assert said == ["The run is not running: it has ended (finished)."]  # not "stop it where it runs"

        await pilot.press("left_square_bracket", "left_square_bracket", "left_square_bracket")
        assert view.position == 0 and "paged" in str(view.border_subtitle)
        assert "step 200" in str(view.border_title)
        await pilot.press("right_square_bracket")
        assert view.position == 1
        write_grid(run / "samples" / "step000700.png", offset=100)
        append(run, {"time": T0 + 50, "kind": "sample", "step": 700, "path": "samples/step000700.png"})
        await wait_until(pilot, lambda: len(view.grids) == 4, what="new grid")
        assert view.position == 1  # paged back: a new grid does not move the view
        await pilot.press("right_square_bracket", "right_square_bracket")
        assert view.index is None and view.position == 3

        await pilot.press("z")
        assert view.mode == "whole"

        before, generation = app.state.events, app._generation
        await pilot.press("r")
        assert app._generation == generation + 1  # a new reading from the first line
        await wait_until(pilot, lambda: app.state.status == "finished" and app.state.events == before, what="reload")
        assert log_text(app).count("run started") == 1

        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


@run_async
async def test_owner_stop_keys_and_quit(tmp_path):
    run = make_run(tmp_path, steps=100)
    owner = FakeOwner()
    app = app_for(run, owner=owner)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 100, what="events")
        await wait_until(pilot, lambda: "s stop" in screen_text(app), what="stop key in the footer")
        await pilot.press("s")
        assert owner.stops == 1 and "STOPPING" in header_text(app)
        await pilot.press("ctrl+c")
        assert owner.stops == 1  # already stopping: not asked twice
        append(
            run, {"time": T0 + 6, "kind": "end", "step": 100, "status": "interrupted", "reason": "stopped by the user"}
        )
        await wait_until(pilot, lambda: app.state.status == "interrupted", what="end")
        assert "INTERRUPTED" in header_text(app)

        await pilot.press("q")  # training has not returned yet: asks first
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert app.is_running and not isinstance(app.screen, ConfirmScreen)
        await pilot.press("q", "y")
        assert app.is_running  # waits for the training to return
        app.post_message(TrainingDone(None))
        await pilot.pause(0.1)
        assert not app.is_running


@run_async
async def test_ctrl_c_stops_an_owned_run(tmp_path):
    run = make_run(tmp_path, steps=50)
    owner = FakeOwner()
    app = app_for(run, owner=owner)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 50, what="events")
        await pilot.press("ctrl+c")
        assert owner.stops == 1 and app.is_running
        app.post_message(TrainingDone("TrainError: disk full"))
        await wait_until(pilot, lambda: app.state.status == "failed", what="failure")
        assert "disk full" in log_text(app)


@run_async
async def test_ctrl_c_quits_a_viewer(tmp_path):
    run = make_run(tmp_path, steps=20)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert not app.is_running


@run_async
async def test_resize_keeps_working(tmp_path):
    run = make_run(tmp_path, steps=600, finished=True)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.status == "finished", what="finished")
        for size in ((120, 40), (60, 16), (200, 60), (80, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.05)
            text = screen_text(app)
            assert "FINISHED" in text
        assert app.screen.has_class("-wide") is False


@run_async
async def test_a_silent_running_run_is_flagged_quiet(tmp_path):
    run = make_run(tmp_path, steps=100)  # last event at T0 + 5
    now = [T0 + 10.0]
    app = make_app(run, poll=0.02, clock=lambda: now[0], tick=None)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 100, what="events")
        assert "quiet" not in header_text(app)
        now[0] = T0 + 5 + 300
        app._on_tick()
        assert "quiet 5:00" in header_text(app)


def _sampled_run(tmp_path, every: int, last_step: int, end: str | None):
    """A run with --sample-every `every` that logged up to `last_step` without a sample grid."""
    run = tmp_path / "run"
    run.mkdir()
    start = start_event(max_steps=60)
    start["config"]["sample_every"] = every
    events = [start] + [train_event(s) for s in range(2, last_step + 1, 2)]
    if end:
        events.append(
            {
                "time": T0 + 10,
                "kind": "end",
                "step": last_step,
                "status": end,
                "reason": "stopped by the user" if end == "interrupted" else "out of memory",
            }
        )
    append(run, *events)
    return run


def test_sample_note_follows_the_run():
    from tarflow_cli.tui.app import sample_note
    from tarflow_cli.tui.state import RunState

    s = RunState("runs/x")
    assert sample_note(s) == "no sample grid yet"
    start = start_event(max_steps=120)
    start["config"]["sample_every"] = 50
    s.apply(start)
    assert sample_note(s) == "no sample grid yet: the first comes at step 50"
    s.apply(train_event(46))
    assert sample_note(s) == "no sample grid yet: the first comes at step 50"
    s.apply(train_event(104))  # the grid at 50 never came: the next one is due at 100 -> the last step
    assert sample_note(s) == "no sample grid yet: the first comes at step 120"
    s.apply({"kind": "end", "step": 104, "status": "interrupted", "reason": "stopped by the user"})
    assert sample_note(s) == "the run was interrupted at step 104, before its first sample grid (due at step 120)"
    s.apply({"kind": "end", "step": 104, "status": "failed"})
    assert sample_note(s).startswith("the run failed at step 104, before its first sample grid")
    s.apply({"kind": "end", "step": 104, "status": "finished"})
    assert sample_note(s) == "the run finished at step 104 without a sample grid"
    s.sample_every = 0
    assert sample_note(s) == "this run makes no sample grids (--sample-every 0)"


def _sample_panel(app) -> str:
    """The words in the sample panel at 80x24 (columns 46-79, below the header)."""
    rows = screen_text(app).splitlines()[3:17]
    return " ".join(" ".join(row[46:].strip("│ ") for row in rows).split())


@run_async
async def test_a_run_that_ends_before_its_first_sample_says_so(tmp_path):
    run = _sampled_run(tmp_path, every=50, last_step=46, end=None)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        view = app.query_one(SampleView)
        await wait_until(pilot, lambda: app.state.step == 46, what="step 46")
        assert view.waiting_note == "no sample grid yet: the first comes at step 50"
        await wait_until(pilot, lambda: "comes at step 50" in _sample_panel(app), what="the waiting note")
        # interrupted at step 46 (--sample-every 50): the panel must not promise a grid any more
        append(
            run, {"time": T0 + 10, "kind": "end", "step": 46, "status": "interrupted", "reason": "stopped by the user"}
        )
        await wait_until(pilot, lambda: app.state.status == "interrupted", what="the end event")
        assert view.waiting_note.startswith("the run was interrupted at step 46, before its first sample grid")
        await wait_until(pilot, lambda: "before its first sample grid" in _sample_panel(app), what="the new note")
        text = screen_text(app)
        assert "comes at step" not in text
        # the header keeps to its two rows: parts that do not fit are left out, memory before loss
        head = text.splitlines()[1]
        assert "reason stopped by the user" in head and "mem 512.0 MiB" in head and "…" not in head


@run_async
async def test_a_run_that_failed_before_its_first_sample_read_afterwards(tmp_path):
    run = _sampled_run(tmp_path, every=50, last_step=12, end="failed")
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.status == "failed", what="the end event")
        assert app.query_one(SampleView).waiting_note.startswith("the run failed at step 12, before its first")
        await wait_until(pilot, lambda: "the run failed at step 12" in _sample_panel(app), what="the note")
        assert "comes at step" not in screen_text(app)


@run_async
async def test_a_run_that_failed_before_its_first_logged_step_has_charts_that_wait_for_nothing(tmp_path):
    # `tarflow train --lr 1e6`: five skipped steps, then `end` failed, before any `train` event
    run = tmp_path / "diverged"
    run.mkdir()
    lines = [start_event(max_steps=300)]
    lines += [
        {
            "time": T0 + s,
            "kind": "warning",
            "step": s,
            "reason": "nonfinite",
            "message": f"non-finite loss or gradient at step {s}: step skipped ({s - 2} in a row)",
        }
        for s in range(3, 8)
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.warnings == 5, what="the warnings")
        await wait_until(pilot, lambda: screen_text(app).count("waiting for data") == 4, what="empty charts")
        append(
            run,
            {
                "time": T0 + 9,
                "kind": "end",
                "step": 7,
                "status": "failed",
                "reason": "5 consecutive steps had non-finite loss or gradients (last at step 7)",
            },
        )
        await wait_until(pilot, lambda: app.state.status == "failed", what="the end event")
        await wait_until(pilot, lambda: "waiting for data" not in screen_text(app), what="charts told")
        assert screen_text(app).count("no data") == 4
        # the header keeps the warning count in sight beside the long reason (cut short)
        head = screen_text(app).splitlines()[1]
        assert "warnings 5" in head and "reason 5 consecutive steps" in head, head
        # read again with r: waiting again until the events come back, then "no data" again
        await pilot.press("r")
        await wait_until(pilot, lambda: app.state.status == "failed", what="the events read again")
        await wait_until(pilot, lambda: screen_text(app).count("no data") == 4, what="charts told again")


def _panel_colours(view) -> set:
    """The background colours the sample panel draws (half blocks: one pixel each)."""
    colours = set()
    for y in range(view.size.height):
        for seg in view.render_line(y):
            if seg.style and seg.style.bgcolor and seg.text.strip():
                colours.add(seg.style.bgcolor.get_truecolor())
    return colours


@run_async
async def test_a_copied_run_shows_its_own_sample_grids_not_the_originals(tmp_path):
    # the events of a copied run name the original's PNG; the copy's own grid must be shown
    from PIL import Image

    def grid(path, rgb):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), rgb).save(path)
        return path

    original = grid(tmp_path / "orig" / "samples" / "step-000010.png", (250, 0, 0))
    copy = tmp_path / "copy"
    grid(copy / "samples" / "step-000010.png", (0, 250, 0))
    (copy / "events.jsonl").write_text(
        "".join(
            json.dumps(e) + "\n"
            for e in (
                start_event(),
                train_event(10),
                {"time": T0 + 1, "kind": "sample", "step": 10, "path": str(original)},
            )
        )
    )
    app = app_for(copy)
    async with app.run_test(size=(80, 24)) as pilot:
        view = app.query_one(SampleView)
        await wait_until(pilot, lambda: view.current is not None and view.current.path in view._images, what="the grid")
        await pilot.pause(0.05)
        colours = _panel_colours(view)
        assert (0, 250, 0) in {tuple(c) for c in colours} and (250, 0, 0) not in {tuple(c) for c in colours}, colours


@run_async
async def test_a_bad_line_is_logged_where_it_was_in_the_file(tmp_path):
    # a finished run read in one go: the note about line 3 came after "run finished"
    run = tmp_path / "garbled"
    run.mkdir()
    lines = [
        json.dumps(start_event()),
        json.dumps(train_event(10)),
        "this is not an event",
        json.dumps({"time": T0 + 5, "kind": "checkpoint", "step": 10, "path": "checkpoints/step-10"}),
        json.dumps({"time": T0 + 6, "kind": "end", "step": 10, "status": "finished", "reason": "reached step 10"}),
    ]
    (run / "events.jsonl").write_text("\n".join(lines) + "\n")
    app = app_for(run)
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_until(pilot, lambda: "run finished" in log_text(app), what="the end")
        text = log_text(app)
        assert (
            text.index("run started")
            < text.index("skipped events.jsonl line 3")
            < text.index("checkpoint saved")
            < text.index("run finished")
        ), text


@run_async
async def test_a_deleted_sample_grid_is_named_on_one_line(tmp_path, monkeypatch):
    # the panel said "runs/r/samples/step-00000700.p" / "ng: not found": the trainer's path, cut
    monkeypatch.setattr(SampleView, "RETRY_DELAYS", (0.01,))
    run = make_run(tmp_path, steps=200, finished=True)
    for png in (run / "samples").glob("*.png"):
        png.unlink()
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "not found" in _sample_panel(app), what="the note")
        rows = [row[46:] for row in screen_text(app).splitlines()[3:17] if "not found" in row]
        assert rows and "step000200.png: not found" in rows[0], rows
        assert "samples/" not in _sample_panel(app)


@run_async
async def test_help_on_a_small_terminal_lists_every_key(tmp_path):
    # at 40x12 the help box was cut off after "s  stop and checkpoint:" (r, [ ], z never shown)
    run = make_run(tmp_path, steps=100)
    app = app_for(run)
    async with app.run_test(size=(40, 12)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 100, what="events")
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        await pilot.pause(0.05)
        text = screen_text(app)
        for words in (
            "q  quit (the run keeps going)",
            "s  stop: only in train --ui tui",
            "ctrl+c  quit",
            "r  reload events.jsonl",
            "[ ]  older / newer grid",
            "z  sample zoom",
        ):
            assert words in text, (words, text)
        # grown to 80x24: the whole help again
        await pilot.resize_terminal(80, 24)
        await wait_until(pilot, lambda: "Charts: train and held-out bpd" in screen_text(app), what="full help")
        assert "r        reload: read events.jsonl again from the first line" in screen_text(app)
        await pilot.press("x")
        assert not isinstance(app.screen, HelpScreen)


@run_async
async def test_s_in_a_viewer_of_a_live_run_says_where_to_stop_it_and_notes_leave_the_log_uncovered(tmp_path):
    run = make_run(tmp_path, steps=100, finished=False)
    app = app_for(run)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: app.state.step == 100, what="events")
        await pilot.press("s")
        await pilot.pause()
        assert any("does not own the run" in n.message for n in app._notifications)
        await wait_until(pilot, lambda: bool(list(app.screen.query("Toast"))), what="a notification")
        toasts = list(app.screen.query("Toast"))
        log = app.query_one("#log").region
        assert all(not toast.region.overlaps(log) for toast in toasts), (log, [t.region for t in toasts])
