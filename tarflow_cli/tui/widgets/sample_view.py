"""The sample grids of a run, drawn with half-block characters (two square pixels per cell).

Images are read by a worker thread (`SampleLoaded` comes back to this widget), never on the UI
thread. Two ways to fit a grid into the panel (`z` switches):
- `detail` (default): the whole grid at the largest whole-number scale that fits (a 4x4 grid of
  8x8 digits grows to fill the panel); when even 1:1 does not fit, as many whole images as fit,
  at 1:1 or larger, so that small images stay legible.
- `whole`: the whole grid shrunk (area-averaged) to the panel.
The panel follows the newest grid until `[` pages back; `]` pages forward, back to following.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import work
from textual.strip import Strip
from textual.widget import Widget
from textual.worker import get_current_worker

from ...io import make_grid
from ..messages import SampleLoaded
from ..records import SampleGrid

_UPPER = "▀"


@dataclass
class Tiles:
    """The images of a grid PNG, cut out (and shrunk back when the writer enlarged them)."""

    images: np.ndarray  # (N, t, t, 3) uint8
    ncol: int  # images per row in the file
    factor: int  # how much the writer had enlarged them


def find_geometry(arr: np.ndarray, tile: int | None = None, padding: int | None = None) -> tuple[int, int] | None:
    """(tile size, padding) of a make_grid-style array: black stripes at a regular period."""
    h, w = arr.shape[:2]
    col_zero = arr.max(axis=(0, 2)) == 0
    row_zero = arr.max(axis=(1, 2)) == 0
    pads = [padding] if padding is not None else [2, 1]
    for p in pads:
        tiles = [tile] if tile else range(2, min(w, h) - p + 1)
        for t in tiles:
            period = t + p
            if (w - p) % period or (h - p) % period:
                continue
            nc, nr = (w - p) // period, (h - p) // period
            if nc * nr < 2 and not tile:
                continue
            if p and not (
                all(col_zero[k * period : k * period + p].all() for k in range(nc + 1))
                and all(row_zero[k * period : k * period + p].all() for k in range(nr + 1))
            ):
                continue
            return t, p
    return None


def cut_tiles(
    img, *, tile: int | None = None, padding: int | None = None, num: int | None = None, ncol: int | None = None
) -> Tiles | None:
    """The images of a grid (None when `img` does not look like one)."""
    arr = np.asarray(img.convert("RGB"))
    geo = find_geometry(arr, tile, padding)
    if geo is None:
        return None
    t, p = geo
    period = t + p
    nc, nr = (arr.shape[1] - p) // period, (arr.shape[0] - p) // period
    tiles = np.stack(
        [
            arr[p + r * period : p + r * period + t, p + c * period : p + c * period + t]
            for r in range(nr)
            for c in range(nc)
        ]
    )
    n = min(num, len(tiles)) if num else len(tiles)
    tiles = tiles[:n]
    factor = 1
    for f in range(t // 4, 1, -1):  # enlarged by whole-pixel repetition: undo it
        if t % f == 0:
            small = tiles[:, ::f, ::f]
            if np.array_equal(tiles, small.repeat(f, axis=1).repeat(f, axis=2)):
                tiles, factor = small, f
                break
    return Tiles(np.ascontiguousarray(tiles), ncol or nc, factor)


def compose(tiles: np.ndarray, ncol: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """HWC tiles -> one grid array, `ncol` per row, each enlarged `scale` times, `pad` black pixels apart."""
    return make_grid(tiles.transpose(0, 3, 1, 2), nrow=max(1, min(ncol, len(tiles))), padding=pad, scale=scale)


def fit_tiles(tiles: Tiles, cols: int, rows: int, mode: str):
    """(PIL image at one pixel per half cell, caption note) for a panel of cols x rows cells."""
    from PIL import Image

    pw, ph = cols, rows * 2
    imgs, n = tiles.images, len(tiles.images)
    t = imgs.shape[1]
    ncol = max(1, min(tiles.ncol, n))
    nrow = -(-n // ncol)

    def scale_for(c: int, r: int) -> int:  # largest whole scale at which c x r tiles fit
        return min((pw - 1) // c - 1, (ph - 1) // r - 1) // t

    k = scale_for(ncol, nrow)
    if k >= 1:
        return Image.fromarray(compose(imgs, ncol, k)), (f"{k}x" if k > 1 else "")
    if mode == "detail":
        c, r = (pw - 1) // (t + 1), (ph - 1) // (t + 1)
        if c >= 1 and r >= 1:
            shown = imgs[: c * r]
            return Image.fromarray(compose(shown, c, 1)), f"{len(shown)} of {n}"
    whole = Image.fromarray(compose(imgs, ncol, 1))
    f = min(pw / whole.size[0], ph / whole.size[1])
    return whole.resize((max(1, int(whole.size[0] * f)), max(1, int(whole.size[1] * f))), Image.BOX), "shrunk"


def fit_image(img, cols: int, rows: int):
    """A picture that is not a grid: enlarged by a whole number, or shrunk, to fit."""
    from PIL import Image

    pw, ph = cols, rows * 2
    w, h = img.size
    k = min(pw // w, ph // h)
    if k >= 1:
        return (img.resize((w * k, h * k), Image.NEAREST) if k > 1 else img), (f"{k}x" if k > 1 else "")
    f = min(pw / w, ph / h)
    return img.resize((max(1, int(w * f)), max(1, int(h * f))), Image.BOX), "shrunk"


def half_block_lines(img, cols: int, rows: int) -> list[Strip]:
    """`img` (RGB) centred in cols x rows cells, two pixels per cell."""
    w, h = img.size
    data = img.tobytes()
    left = max(0, (cols - w) // 2)
    top = max(0, (rows - (h + 1) // 2) // 2)
    blank = Strip([Segment(" " * cols)], cols)
    strips = [blank] * rows
    cache: dict[tuple, Style] = {}

    def px(x: int, y: int) -> tuple[int, int, int] | None:
        if y >= h:
            return None
        i = (y * w + x) * 3
        return data[i], data[i + 1], data[i + 2]

    for r in range((h + 1) // 2):
        row = top + r
        if row >= rows:
            break
        segs = [Segment(" " * left)] if left else []
        for x in range(min(w, cols - left)):
            a, b = px(x, 2 * r), px(x, 2 * r + 1)
            key = (a, b)
            st = cache.get(key)
            if st is None:
                st = Style(color=Color.from_rgb(*a), bgcolor=Color.from_rgb(*b) if b else None)
                cache[key] = st
            segs.append(Segment(_UPPER, st))
        used = left + min(w, cols - left)
        if used < cols:
            segs.append(Segment(" " * (cols - used)))
        strips[row] = Strip(segs, cols)
    return strips


class SampleView(Widget, can_focus=False):
    DEFAULT_CSS = """
    SampleView { height: 1fr; }
    """

    # seconds between tries at a grid that is missing or unreadable (it may be being written)
    RETRY_DELAYS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

    def __init__(
        self, *, graphics: str = "halfblock", name: str | None = None, id: str | None = None, classes: str | None = None
    ):
        super().__init__(name=name, id=id, classes=classes)
        self.graphics = graphics  # halfblock, kitty or sixel (see graphics.py)
        self._graphic = None  # the textual-image widget, for kitty / sixel
        self.run_dir = Path(".")
        self.grids: list[SampleGrid] = []
        self.index: int | None = None  # None: follow the newest
        self.mode = "detail"
        self.waiting_note = "no sample grid yet"
        self._images: OrderedDict[Path, object] = OrderedDict()  # path -> PIL image (LRU)
        self._errors: dict[Path, str] = {}
        self._loading: set[Path] = set()
        self._tiles: dict[Path, Tiles | None] = {}
        self._cache: tuple[tuple, list[Strip]] | None = None
        self._note = ""
        self.border_title = "samples"

    def compose(self):
        if self.graphics != "halfblock":
            from ..graphics import image_widget

            self._graphic = image_widget(self.graphics)
            yield self._graphic

    # --------------------------------------------------------------------------- control
    def set_grids(self, grids: list[SampleGrid], run_dir: Path) -> None:
        self.run_dir = run_dir
        self.grids = list(grids)
        if self.index is not None and self.index >= len(self.grids):
            self.index = None
        self._changed()

    def set_waiting_note(self, note: str) -> None:
        """What the panel says while there is no grid to show."""
        if note != self.waiting_note:
            self.waiting_note = note
            self._cache = None
            self.refresh()

    def reset(self) -> None:
        self.grids = []
        self.index = None
        self._images.clear()
        self._errors.clear()
        self._tiles.clear()
        self._changed()

    @property
    def current(self) -> SampleGrid | None:
        if not self.grids:
            return None
        return self.grids[-1] if self.index is None else self.grids[self.index]

    @property
    def position(self) -> int:
        return len(self.grids) - 1 if self.index is None else self.index

    def page(self, delta: int) -> None:
        if not self.grids:
            return
        pos = min(len(self.grids) - 1, max(0, self.position + delta))
        self.index = None if pos == len(self.grids) - 1 else pos
        self._changed()

    def toggle_mode(self) -> str:
        self.mode = "whole" if self.mode == "detail" else "detail"
        self._changed()
        return self.mode

    def _changed(self) -> None:
        self._cache = None
        grid = self.current
        if (
            grid is not None
            and grid.path not in self._images
            and grid.path not in self._errors
            and grid.path not in self._loading
        ):
            self._loading.add(grid.path)
            self._load(grid, grid.candidates(self.run_dir))
        self._update_titles()
        self._update_graphic()
        self.refresh()

    def _update_graphic(self) -> None:
        """Kitty / Sixel: hand the whole grid (tiles re-spaced, whole-number enlarged) to the image widget."""
        if self._graphic is None:
            return
        from PIL import Image

        from ..graphics import cell_pixels

        grid = self.current
        img = self._images.get(grid.path) if grid else None
        if img is None:
            self._graphic.image = None
            return
        tiles = self._tiles.get(grid.path)
        if tiles is not None:
            img = Image.fromarray(compose(tiles.images, tiles.ncol, 1))
        cw, ch = cell_pixels()
        room_w, room_h = self.content_size.width * cw, self.content_size.height * ch
        if room_w <= 0 or room_h <= 0:
            return
        w, h = img.size
        k = min(room_w / w, room_h / h)
        if k >= 1:
            k = int(k)
            img = img.resize((w * k, h * k), Image.NEAREST) if k > 1 else img
        w, h = int(w * k), int(h * k)
        # size the widget in whole cells, the picture centred on black in exactly that many
        # pixels (so it keeps its aspect and is not letterboxed in white)
        cells_w = max(1, min(self.content_size.width, -(-w // cw)))
        cells_h = max(1, min(self.content_size.height, -(-h // ch)))
        if img.size != (w, h):
            img = img.resize((max(1, w), max(1, h)), Image.BOX)
        canvas = Image.new("RGB", (cells_w * cw, cells_h * ch))
        canvas.paste(img, ((canvas.size[0] - img.size[0]) // 2, (canvas.size[1] - img.size[1]) // 2))
        self._graphic.styles.width = cells_w
        self._graphic.styles.height = cells_h
        self._graphic.image = canvas

    def on_resize(self, event) -> None:
        self._update_graphic()

    def _update_titles(self) -> None:
        grid = self.current
        if grid is None:
            self.border_title = "samples"
            self.border_subtitle = ""
            return
        pos = f"{self.position + 1}/{len(self.grids)}"
        follow = "" if self.index is None else " [b]paged[/]"
        self.border_title = f"samples · step {grid.step:,}"
        note = f" · {self._note}" if self._note else ""
        self.border_subtitle = f"{pos}{follow}{note}"

    # --------------------------------------------------------------------------- loading
    @work(thread=True, group="samples")
    def _load(self, grid: SampleGrid, candidates: list[Path]) -> None:
        """Worker thread: read the PNG (retrying briefly: it may be being written) and post it."""
        from PIL import Image

        worker = get_current_worker()
        error = "not found (deleted?)"
        for delay in self.RETRY_DELAYS:
            if worker.is_cancelled:
                return
            for p in candidates:
                try:
                    with Image.open(p) as im:
                        im.load()
                        img = im.convert("RGB")
                    tiles = cut_tiles(img, tile=grid.tile, padding=grid.padding, num=grid.num, ncol=grid.nrow)
                    self.post_message(SampleLoaded(grid.path, img, tiles=tiles))
                    return
                except FileNotFoundError:
                    continue
                except Exception as e:  # unreadable or half-written: say so, maybe retry
                    error = f"unreadable: {e}"
            time.sleep(delay)
        # the name only: the path as the event gave it is the trainer's, and wraps badly
        self.post_message(SampleLoaded(grid.path, None, f"{grid.path.name}: {error}"))

    def on_sample_loaded(self, message: SampleLoaded) -> None:
        message.stop()
        self._loading.discard(message.path)
        if message.image is None:
            self._errors[message.path] = message.error or "unreadable"
        else:
            self._images[message.path] = message.image
            self._tiles[message.path] = message.tiles
            self._images.move_to_end(message.path)
            while len(self._images) > 12:
                old, _ = self._images.popitem(last=False)
                self._tiles.pop(old, None)
        self._cache = None
        self._update_graphic()
        self.refresh()

    # ---------------------------------------------------------------------------- render
    def _ensure_strips(self) -> list[Strip]:
        cols, rows = self.content_size.width, self.content_size.height
        grid = self.current
        key = (
            cols,
            rows,
            self.mode,
            grid.path if grid else None,
            id(self._images.get(grid.path)) if grid else 0,
            self._errors.get(grid.path) if grid else self.waiting_note,
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        strips = self._draw(cols, rows, grid)
        self._cache = (key, strips)
        return strips

    def render_line(self, y: int) -> Strip:
        strips = self._ensure_strips()
        return strips[y] if y < len(strips) else Strip.blank(self.content_size.width)

    def _message(self, cols: int, rows: int, text: str, style: str = "dim") -> list[Strip]:
        lines = [Strip.blank(cols)] * rows
        words = Text(text, style=style)
        wrapped = words.wrap(self.app.console, max(1, cols - 2), justify="center")
        start = max(0, (rows - len(wrapped)) // 2)
        for i, line in enumerate(wrapped):
            if start + i < rows:
                line.pad_left(1)
                segs = list(line.render(self.app.console))
                lines[start + i] = Strip(segs).adjust_cell_length(cols)
        return lines

    def _draw(self, cols: int, rows: int, grid: SampleGrid | None) -> list[Strip]:
        if cols <= 0 or rows <= 0:
            return []
        if self._graphic is not None and grid is not None and grid.path in self._images:
            return [Strip.blank(cols)] * rows  # the image widget draws it
        old_note = self._note
        self._note = ""
        try:
            if grid is None:
                return self._message(cols, rows, self.waiting_note)
            img = self._images.get(grid.path)
            if img is None:
                err = self._errors.get(grid.path)
                if err:
                    return self._message(cols, rows, err, "red")
                return self._message(cols, rows, f"reading {grid.path.name}…")
            tiles = self._tiles.get(grid.path)
            if tiles is not None:
                shown, note = fit_tiles(tiles, cols, rows, self.mode)
            else:
                shown, note = fit_image(img, cols, rows)
            self._note = note
            return half_block_lines(shown, cols, rows)
        finally:
            if self._note != old_note:
                self.call_after_refresh(self._update_titles)
