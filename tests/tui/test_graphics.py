"""Choosing how sample grids are drawn, and the Kitty/Sixel path when textual-image is there."""

from __future__ import annotations

import pytest

from tarflow_cli.tui import graphics
from tarflow_cli.tui.app import make_app
from tarflow_cli.tui.widgets.sample_view import SampleView

from .canned import T0, make_run
from .helpers import run_async, wait_until


class Tty:
    def isatty(self):
        return True


def test_half_blocks_unless_a_terminal_asks_for_more(monkeypatch):
    for var in ("TARFLOW_GRAPHICS", "TMUX", "STY", "KITTY_WINDOW_ID"):
        monkeypatch.delenv(var, raising=False)
    assert graphics.pick_graphics("halfblock") == ("halfblock", None)
    assert graphics.pick_graphics("auto")[0] == "halfblock"  # pytest's stdout is not a terminal
    monkeypatch.setattr(graphics.sys, "stdout", Tty())
    monkeypatch.setattr(graphics.sys, "stdin", Tty())
    monkeypatch.setenv("TERM", "xterm-256color")
    assert graphics.pick_graphics("auto") == ("halfblock", None)
    monkeypatch.setenv("TERM", "xterm-kitty")
    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    assert graphics.pick_graphics("auto") == ("halfblock", None)  # tmux drops the images
    kind, note = graphics.pick_graphics("bogus")
    assert kind == "halfblock" and "unknown graphics" in note
    monkeypatch.setenv("TARFLOW_GRAPHICS", "halfblock")
    assert graphics.pick_graphics("sixel") == ("halfblock", None)


def test_without_textual_image_kitty_falls_back_with_a_note(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_textual_image(name, *a, **kw):
        if name.startswith("textual_image"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.delenv("TARFLOW_GRAPHICS", raising=False)
    monkeypatch.delenv("TMUX", raising=False)
    monkeypatch.setattr(graphics.sys, "stdout", Tty())
    monkeypatch.setattr(graphics.sys, "stdin", Tty())
    monkeypatch.setattr(builtins, "__import__", no_textual_image)
    kind, note = graphics.pick_graphics("kitty")
    assert kind == "halfblock" and "textual-image" in note
    monkeypatch.setenv("TERM", "xterm-kitty")
    assert graphics.pick_graphics("auto") == ("halfblock", None)  # silent when not asked for


@run_async
async def test_sixel_widget_gets_the_grid(tmp_path):
    pytest.importorskip("textual_image.widget")
    run = make_run(tmp_path, steps=600, finished=True)
    app = make_app(run, poll=0.02, clock=lambda: T0 + 40, tick=None, graphics="sixel")
    async with app.run_test(size=(120, 40)) as pilot:
        view = app.query_one(SampleView)
        await wait_until(
            pilot, lambda: view.current is not None and view.current.path in view._images, what="the sample grid"
        )
        await pilot.pause(0.1)
        image = view._graphic.image
        cw, ch = graphics.cell_pixels()
        assert image is not None and image.size[0] % cw == 0 and image.size[1] % ch == 0
        assert view._graphic.styles.width.value * cw == image.size[0]
