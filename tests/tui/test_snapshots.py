"""Snapshots of the main screen at 80x24 and 120x40 with fixed data, and at 50x15 (smaller than
the dashboard is meant for: panels dropped, nothing clipped).

Each size has a plain-text snapshot (always compared) and an SVG screenshot (compared when the
installed Textual is the version that recorded it, since Textual's rendering details change
between releases). To record them again after a deliberate change:

    TARFLOW_UPDATE_SNAPSHOTS=1 pytest tests/tui/test_snapshots.py

then look at the SVGs (any browser) before committing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import textual

from tarflow_cli.tui.app import make_app
from tarflow_cli.tui.widgets.sample_view import SampleView

from .canned import T0, make_run
from .helpers import run_async, screen_text, wait_until

SNAPSHOTS = Path(__file__).parent / "snapshots"
VERSION_FILE = SNAPSHOTS / "TEXTUAL_VERSION"
UPDATE = os.environ.get("TARFLOW_UPDATE_SNAPSHOTS") == "1"


async def _capture(run: Path, size: tuple[int, int]) -> tuple[str, str]:
    app = make_app(run, poll=0.02, clock=lambda: T0 + 40.0, tick=None)
    async with app.run_test(size=size) as pilot:
        view = app.query_one(SampleView)
        await wait_until(pilot, lambda: app.state.status == "finished", what="the end event")
        await wait_until(
            pilot, lambda: view.current is not None and view.current.path in view._images, what="the sample grid"
        )
        await wait_until(pilot, lambda: "q quit" in screen_text(app), what="the footer")
        await pilot.pause(0.1)
        return screen_text(app), app.export_screenshot()


def _normalise_svg(svg: str) -> str:
    return re.sub(r"terminal-\d+", "terminal", svg)


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (50, 15)], ids=["80x24", "120x40", "50x15"])
@run_async
async def test_main_screen(tmp_path, size):
    run = make_run(tmp_path, steps=600, finished=True)
    text, svg = await _capture(run, size)
    name = f"main_{size[0]}x{size[1]}"
    txt_file, svg_file = SNAPSHOTS / f"{name}.txt", SNAPSHOTS / f"{name}.svg"
    if UPDATE or not txt_file.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"missing snapshot {txt_file}; record it with TARFLOW_UPDATE_SNAPSHOTS=1")
        SNAPSHOTS.mkdir(exist_ok=True)
        txt_file.write_text(text, encoding="utf-8")
        svg_file.write_text(svg, encoding="utf-8")
        VERSION_FILE.write_text(textual.__version__ + "\n")
        return
    assert text == txt_file.read_text(encoding="utf-8"), (
        f"the {name} screen changed; if that was meant, record it again with TARFLOW_UPDATE_SNAPSHOTS=1"
    )
    recorded = VERSION_FILE.read_text().strip() if VERSION_FILE.exists() else ""
    if recorded == textual.__version__ and svg_file.exists():
        assert _normalise_svg(svg) == _normalise_svg(svg_file.read_text(encoding="utf-8")), (
            f"the {name} screenshot changed (colours or styles); record again with TARFLOW_UPDATE_SNAPSHOTS=1"
        )
