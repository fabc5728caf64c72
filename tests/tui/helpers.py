"""Test helpers: waiting on a running app, and reading what its widgets show."""

from __future__ import annotations

import asyncio
import functools
import io
import time

from rich.console import Console


def run_async(fn):
    """Run an `async def` test with asyncio.run (no pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


async def wait_until(pilot, condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


def header_text(app) -> str:
    from tarflow_cli.tui.widgets.run_header import RunHeader

    return app.query_one(RunHeader).render().plain


def log_text(app) -> str:
    from tarflow_cli.tui.widgets.event_log import EventLog

    log = app.query_one(EventLog)
    return " ".join(" ".join(strip.text for strip in log.lines).split())  # wrapped lines joined


def screen_text(app) -> str:
    """The whole screen as plain text (what a terminal would show, without colours)."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        color_system="truecolor",
        record=True,
        legacy_windows=False,
        safe_box=False,
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()
