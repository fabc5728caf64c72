"""The layout at the sizes that matter: every chart (loss included) at 80x24, and smaller
terminals that drop panels cleanly instead of drawing them clipped."""

from __future__ import annotations

from tarflow_cli.tui.app import MIN_HEIGHT, MIN_WIDTH, make_app
from tarflow_cli.tui.widgets.event_log import EventLog
from tarflow_cli.tui.widgets.line_chart import LineChart
from tarflow_cli.tui.widgets.sample_view import SampleView

from .canned import T0, append, make_run
from .helpers import log_text, run_async, screen_text, wait_until


def app_for(run):
    return make_app(run, poll=0.02, clock=lambda: T0 + 40.0, tick=None)


def shown(app, widget) -> bool:
    return widget.display and widget.region.area > 0 and app.screen.find_widget(widget) is not None


async def settle(pilot, app, size) -> None:
    """Wait for the screen to be laid out at `size` and drawn (the footer on its last row)."""

    def drawn() -> bool:
        rows = screen_text(app).splitlines()
        return tuple(app.size) == size and len(rows) == size[1] and "q quit" in rows[-1]

    await wait_until(pilot, drawn, what=f"the screen at {size}")
    await pilot.pause(0.02)


def check_clean(app) -> str:
    """No screen scroll bar, every panel wholly on the screen and above the footer, the
    footer on the last row with nothing else in it, the header's two lines not wrapped."""
    width, height = app.size
    screen = app.screen
    assert not screen.show_vertical_scrollbar and not screen.show_horizontal_scrollbar
    assert screen.max_scroll_y == 0 and screen.max_scroll_x == 0
    footer = app.query_one("Footer")
    assert footer.region.y == height - 1 and footer.region.height == 1
    for wid in app.query("#header, #body, #log, #too-small, .chart, #samples"):
        if not wid.display or not wid.region.area:
            continue
        r = wid.region
        assert r.x >= 0 and r.y >= 0 and r.right <= width and r.bottom <= height - 1, (wid, r, app.size)
    text = screen_text(app)
    rows = text.splitlines()
    assert len(rows) == height
    footer_row = rows[-1]
    assert "q quit" in footer_row and not set(footer_row) & set("│╭╮╰╯▁▂▃▄▅▆▇█"), footer_row
    assert rows[1].startswith(" elapsed"), rows[:2]  # line one never wraps onto line two
    return text


@run_async
async def test_every_chart_at_80x24(tmp_path):
    run = make_run(tmp_path, steps=600, finished=True)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.status == "finished", what="finished")
        await wait_until(pilot, lambda: "q quit" in screen_text(app), what="the footer")
        text = check_clean(app)
        charts = {c.id: c for c in app.query(LineChart)}
        assert set(charts) == {"chart-bpd", "chart-loss", "chart-lr", "chart-speed"}
        for chart in charts.values():
            assert shown(app, chart), chart.id
            assert chart.size.width >= 19 and chart.size.height >= 6, (chart.id, chart.size)
        for title in ("bpd ━ train 3.01", "loss ━ -2.77", "lr ━ 2.0e-3", "img/s ━ 1229", "━ held-out 3.26"):
            assert title in text, title
        # the bpd legend does not fit one border: held-out moves to the bottom edge, nothing is cut
        bpd = charts["chart-bpd"]
        assert "held-out" not in str(bpd.border_title) and "held-out 3.26" in str(bpd.border_subtitle)
        assert not any("…" in row[:46] for row in text.splitlines()[2:18])  # no chart title cut short
        assert shown(app, app.query_one(SampleView)) and shown(app, app.query_one(EventLog))


@run_async
async def test_small_terminals_drop_panels_cleanly(tmp_path):
    run = make_run(tmp_path, steps=300, finished=False)
    app = app_for(run)
    async with app.run_test(size=(50, 15)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 300, what="events")
        await wait_until(pilot, lambda: "q quit" in screen_text(app), what="the footer")
        text = check_clean(app)
        # 50x15: the four charts, no sample panel and no log (their room would clip them)
        assert all(shown(app, c) for c in app.query(LineChart))
        assert not shown(app, app.query_one(SampleView)) and not shown(app, app.query_one(EventLog))
        assert "loss ━" in text and "too small" not in text

        for size in (
            (60, 18),
            (79, 23),
            (MIN_WIDTH, MIN_HEIGHT),
            (MIN_WIDTH - 1, 20),
            (70, MIN_HEIGHT - 1),
            (30, 8),
            (20, 4),
        ):
            await pilot.resize_terminal(*size)
            await settle(pilot, app, size)
            text = check_clean(app)
            tiny = size[0] < MIN_WIDTH or size[1] < MIN_HEIGHT
            assert app.screen.has_class("-tiny") == tiny, size
            assert shown(app, app.query_one("#body")) != tiny, size
            if tiny and size[1] >= 8:
                assert "too small" in text, (size, text)
            if size == (60, 18):
                assert shown(app, app.query_one(SampleView)) and shown(app, app.query_one(EventLog))

        # events that arrive while the log is hidden are there when it comes back
        await pilot.resize_terminal(50, 15)
        await settle(pilot, app, (50, 15))
        append(run, {"time": T0 + 20, "kind": "warning", "step": 300, "message": "written while hidden"})
        await wait_until(pilot, lambda: app.state.warnings == 2, what="the warning")
        await pilot.resize_terminal(80, 24)
        await settle(pilot, app, (80, 24))
        await wait_until(pilot, lambda: "written while hidden" in screen_text(app), what="the log line")
        text = check_clean(app)
        assert shown(app, app.query_one(EventLog)) and "written while hidden" in log_text(app)
        assert "written while hidden" in text and "too small" not in text


@run_async
async def test_the_too_small_notice_is_never_cut(tmp_path):
    # at 20x5 the notice was cut to "terminal too small / (20x5): the", its size demand lost
    run = make_run(tmp_path, steps=100, finished=False)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 100, what="events")
        for size in ((39, 11), (30, 8), (20, 5), (24, 6), (14, 4), (60, 5)):
            await pilot.resize_terminal(*size)
            await settle(pilot, app, size)
            text = check_clean(app)
            middle = " ".join(" ".join(text.splitlines()[2:-1]).split())
            assert middle.endswith(f"needs {MIN_WIDTH}x{MIN_HEIGHT}") or middle.endswith(
                f"needs at least {MIN_WIDTH}x{MIN_HEIGHT}"
            ), (size, text)
