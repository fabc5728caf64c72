"""Which way the sample grid is drawn: half blocks (always works, the default) or terminal graphics.

Kitty's graphics protocol and Sixel come from the optional `textual-image` package. `auto` picks
Kitty graphics in kitty itself (TERM=xterm-kitty or KITTY_WINDOW_ID, not inside tmux/screen,
which drop the images) when `textual-image` is installed, else half blocks. Sixel is used only
when asked for (`--graphics sixel` or TARFLOW_GRAPHICS=sixel): it works (tried in xterm -ti
vt340), but terminals that do not report their cell size in pixels get a stretched picture.
`pick_graphics` must run before the app starts: `textual-image` asks the terminal for its cell
size, which cannot be done once Textual owns the terminal.
"""

from __future__ import annotations

import os
import sys

CHOICES = ("auto", "halfblock", "kitty", "sixel")


def pick_graphics(choice: str = "auto") -> tuple[str, str | None]:
    """(halfblock | kitty | sixel, a note when the choice could not be honoured)."""
    choice = (os.environ.get("TARFLOW_GRAPHICS") or choice or "auto").strip().lower()
    if choice not in CHOICES:
        return "halfblock", f"unknown graphics {choice!r} (expected {', '.join(CHOICES)}); using half blocks"
    if choice == "halfblock":
        return "halfblock", None
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        return "halfblock", None
    asked = choice
    if choice == "auto":
        in_multiplexer = bool(
            os.environ.get("TMUX") or os.environ.get("STY") or os.environ.get("TERM", "").startswith(("screen", "tmux"))
        )
        is_kitty = os.environ.get("TERM") == "xterm-kitty" or bool(os.environ.get("KITTY_WINDOW_ID"))
        if in_multiplexer or not is_kitty:
            return "halfblock", None
        choice = "kitty"
    try:
        import textual_image.widget  # noqa: F401  (queries the cell size while it still can)
    except ImportError:
        if asked == "auto":
            return "halfblock", None
        return (
            "halfblock",
            f"{choice} graphics need the textual-image package (pip install textual-image); using half blocks",
        )
    except Exception as e:  # a terminal that does not answer, a closed stdout, ...
        return "halfblock", f"terminal graphics unavailable ({e}); using half blocks"
    return choice, None


def image_widget(kind: str):
    """A textual-image widget for `kind` (kitty or sixel)."""
    from textual_image.widget import SixelImage, TGPImage

    cls = TGPImage if kind == "kitty" else SixelImage
    return cls(None, classes="sample-graphic")


def cell_pixels() -> tuple[int, int]:
    """Pixels of one terminal cell (width, height), as textual-image measured them."""
    try:
        from textual_image._terminal import get_cell_size

        size = get_cell_size()
        return max(1, size.width), max(1, size.height)
    except Exception:
        return 10, 20
