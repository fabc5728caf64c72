"""Single charts on their own, as they are drawn: axis labels and titles."""

from __future__ import annotations

from textual.app import App, ComposeResult

from tarflow_cli.tui.records import Series
from tarflow_cli.tui.widgets.line_chart import Line, LineChart

from .helpers import run_async, screen_text, wait_until


class ChartApp(App[None]):
    def __init__(self, chart: LineChart, data: dict):
        super().__init__()
        self.chart, self.data = chart, data

    def compose(self) -> ComposeResult:
        yield self.chart

    def on_mount(self) -> None:
        self.chart.set_data(self.data)


def series(points) -> Series:
    s = Series()
    for step, value in points:
        s.add(step, value)
    return s


def axis_labels_on_screen(text: str) -> list[str]:
    return [row.split("┤")[0].strip() for row in text.splitlines() if "┤" in row]


@run_async
async def test_a_chart_that_starts_at_zero_labels_its_bottom_0_at_every_height():
    # images/s of a run whose last step was cut short: the range starts at 0, and the bottom
    # label must say 0, not a rounding residue such as -1.1e-13
    speeds = series([(s, 940.0 - (s % 7)) for s in range(25, 700, 25)] + [(700, 33.1)])
    app = ChartApp(LineChart("img/s", (Line("images_per_s", "", "green"),), id="c"), {"images_per_s": speeds})
    async with app.run_test(size=(30, 24)) as pilot:
        for height in range(2, 25):
            await pilot.resize_terminal(30, height)
            await wait_until(
                pilot,
                lambda: len(screen_text(app).splitlines()) == height and "┤" in screen_text(app),
                what=f"height {height}",
            )
            labels = axis_labels_on_screen(screen_text(app))
            assert labels[-1] == "0", (height, labels)
            assert not any("e-1" in label for label in labels), (height, labels)


def _bpd_chart_app(width: int):
    bpd = series([(s, 7.5 - s / 1000) for s in range(25, 400, 25)])
    held = series([(s, 6.9 - s / 1000) for s in range(100, 400, 100)])
    chart = LineChart("bpd", (Line("bpd", "train", "cyan"), Line("eval_bpd", "held-out", "magenta")), id="c")
    chart.styles.width = width
    chart.styles.border = ("round", "white")
    return ChartApp(chart, {"bpd": bpd, "eval_bpd": held})


@run_async
async def test_a_narrow_bpd_chart_keeps_both_values_on_its_border():
    # at 60x18 the dashboard's bpd chart is 18 columns wide: its title was cut to "bpd ━ train…"
    # and the held-out value was nowhere on screen
    for width in (18, 20, 24, 40):
        app = _bpd_chart_app(width)
        async with app.run_test(size=(60, 10)) as pilot:
            await wait_until(pilot, lambda: "┤" in screen_text(app), what="the chart")
            rows = screen_text(app).splitlines()
            top, bottom = rows[0][:width], rows[9][:width]
            assert "bpd" in top and "7.12" in top, (width, top)
            assert "6.60" in top + bottom, (width, top, bottom)
            assert "…" not in top + bottom, (width, top, bottom)


@run_async
async def test_a_narrow_single_line_chart_drops_the_step_range_before_its_value():
    loss = series([(s, -0.5 - s / 1000) for s in range(25, 200_001, 25)])
    chart = LineChart("loss", (Line("loss", "", "cyan"),), id="c")
    chart.styles.width, chart.styles.border = 17, ("round", "white")
    app = ChartApp(chart, {"loss": loss})
    async with app.run_test(size=(40, 10)) as pilot:
        await wait_until(pilot, lambda: "┤" in screen_text(app), what="the chart")
        rows = screen_text(app).splitlines()
        assert "loss ━ -200" in rows[0] and "…" not in rows[0] + rows[9], rows


@run_async
async def test_a_constant_series_is_one_flat_line():
    # a constant learning rate was drawn with its ends a dot lower than its middle (float noise
    # in the per-column means, on a range centred on the value)
    lr = series([(s, 0.002) for s in range(1, 200_001)])
    app = ChartApp(LineChart("lr", (Line("lr", "", "yellow"),), id="c"), {"lr": lr})
    async with app.run_test(size=(22, 6)) as pilot:
        for width, height in ((22, 6), (22, 7), (30, 5), (40, 8), (60, 12)):
            await pilot.resize_terminal(width, height)
            await wait_until(
                pilot, lambda: tuple(app.size) == (width, height) and "┤" in screen_text(app), what=f"{width}x{height}"
            )
            plot = [row.split("┤")[-1] if "┤" in row else row.split("│")[-1] for row in screen_text(app).splitlines()]
            dotted = [row for row in plot if any("\u2801" <= ch <= "\u28ff" for ch in row)]
            assert len(dotted) == 1 and len(set(dotted[0].strip())) == 1, (width, height, plot)
