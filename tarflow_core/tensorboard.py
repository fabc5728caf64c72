"""A run in TensorBoard: the events of `events.jsonl` written as TensorBoard scalars and images.

The events file stays the run's one record; this is one more reader of it, like the dashboard.
`TensorBoardExport.write(event)` turns one event into TensorBoard's own records: the `train`
metrics (loss, bpd, lr, grad norm, images/s, TFLOP/s, ...) and the held-out bpd of `eval` events
as scalars at the event's step and wall time, and the PNG grid a `sample` event names as an image
(its bytes as written, not re-encoded). A `start` event below a step already written (a resumed
run goes back to its checkpoint's step) is written as TensorBoard's "session start" one step after
it, which makes TensorBoard drop the earlier points past the checkpoint, as the run itself did.

Needs the `tensorboard` package (the `tarflow[tensorboard]` extra), imported only here and only
when a writer is made; TensorBoardMissing says how to install it. Writing to a folder first
removes the files an earlier export wrote there, so exporting again never doubles a point.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import EVENTS_FILE, grid_candidates, read_events

TENSORBOARD_DIR = "tensorboard"  # default output folder, inside the run directory
INSTALL_HINT = "pip install 'tarflow[tensorboard]'"
FILE_SUFFIX = ".tarflow"  # marks the event files this module writes (and may replace)
SAMPLES_TAG = "samples"

# (event kind, event field, TensorBoard tag): what becomes a scalar
SCALARS = (
    ("train", "loss", "train/loss"),
    ("train", "bpd", "train/bpd"),
    ("train", "nll", "train/nll"),
    ("train", "logdet", "train/logdet"),
    ("train", "lr", "train/lr"),
    ("train", "grad_norm", "train/grad_norm"),
    ("train", "images_per_s", "speed/images_per_s"),
    ("train", "tflops", "speed/tflops"),
    ("train", "memory_mb", "system/memory_mb"),
    ("train", "epoch", "train/epoch"),
    ("eval", "bpd", "eval/bpd"),  # a variational run's bound
    ("eval", "bpd_uniform", "eval/bpd_uniform"),  # a variational run's, with uniform dequantization
)


class TensorBoardMissing(ImportError):
    """The `tensorboard` package is not installed."""


def require_tensorboard() -> None:
    """Raise TensorBoardMissing (one sentence naming the extra) unless tensorboard can be imported."""
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        raise TensorBoardMissing(
            f"TensorBoard output needs the tensorboard package: {INSTALL_HINT} (or pip install tensorboard)"
        ) from None


@dataclass
class ExportCounts:
    """What an export wrote: scalar points, images, and sample grids whose file was not found."""

    scalars: int = 0
    images: int = 0
    missing_grids: list[str] = field(default_factory=list)
    ended: dict | None = None  # the run's `end` event, when one was read


def number(value: Any) -> float | None:
    """A scalar's value: numbers and the strings events use for non-finite ones ("nan", "inf")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


class TensorBoardExport:
    """Writes events as TensorBoard records into `out_dir` (default RUN_DIR/tensorboard/).

    Thread-safe (`write` may be called from a training thread while another flushes). Call `close()`
    (or use it as a context manager) so the last records reach the disk."""

    def __init__(self, run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, flush_secs: float = 5):
        require_tensorboard()
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.run_dir = Path(run_dir)
        self.out_dir = Path(out_dir) if out_dir is not None else self.run_dir / TENSORBOARD_DIR
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_earlier_exports(self.out_dir)
        self.counts = ExportCounts()
        self._lock = threading.Lock()
        self._max_step: int | None = None
        self._writer = EventFileWriter(str(self.out_dir), flush_secs=flush_secs, filename_suffix=FILE_SUFFIX)

    # ------------------------------------------------------------------------------ public
    def write(self, event: dict) -> None:
        """One event's records (none for kinds that carry no metric or image)."""
        kind, step = event.get("kind"), event.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        wall = event.get("time") if isinstance(event.get("time"), (int, float)) else time.time()
        with self._lock:
            if kind == "start" and self._max_step is not None and step < self._max_step:
                self._session_start(step + 1, wall)  # the checkpoint's own step stays
            elif kind in ("train", "eval"):
                self._scalars(event, kind, step, wall)
            elif kind == "sample":
                self._image(event, step, wall)
            elif kind == "end":
                self.counts.ended = event
            self._max_step = step if self._max_step is None else max(self._max_step, step)

    def write_all(self, events: Iterable[dict]) -> ExportCounts:
        for e in events:
            self.write(e)
        self.flush()
        return self.counts

    def flush(self) -> None:
        with self._lock:
            self._writer.flush()

    def close(self) -> None:
        with self._lock:
            self._writer.close()

    def __enter__(self) -> TensorBoardExport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------- records
    def _add(self, step: int, wall: float, **what: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._writer.add_event(Event(wall_time=float(wall), step=step, **what))

    def _session_start(self, step: int, wall: float) -> None:
        from tensorboard.compat.proto.event_pb2 import SessionLog

        self._add(step, wall, session_log=SessionLog(status=SessionLog.START))

    def _scalars(self, event: dict, kind: str, step: int, wall: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = []
        for k, name, tag in SCALARS:
            v = number(event.get(name)) if k == kind else None
            if v is not None:
                values.append(Summary.Value(tag=tag, simple_value=v))
        if values:
            self._add(step, wall, summary=Summary(value=values))
            self.counts.scalars += len(values)

    def _image(self, event: dict, step: int, wall: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        path = event.get("path") or event.get("image") or event.get("file")
        if not isinstance(path, str) or not path:
            return
        image = _read_png(grid_candidates(self.run_dir, path))
        if image is None:
            self.counts.missing_grids.append(path)
            return
        self._add(step, wall, summary=Summary(value=[Summary.Value(tag=SAMPLES_TAG, image=Summary.Image(**image))]))
        self.counts.images += 1


def _read_png(candidates: list[Path]) -> dict | None:
    """The first readable candidate as Summary.Image fields: its PNG bytes as written (a grid in
    another format or colour mode is re-encoded as PNG), or None when none can be read."""
    from PIL import Image

    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
    for path in candidates:
        try:
            data = path.read_bytes()
            with Image.open(path) as img:
                img.load()
                if img.format != "PNG" or img.mode not in channels:
                    img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
                    data = _png_bytes(img)
                return dict(
                    height=img.height, width=img.width, colorspace=channels[img.mode], encoded_image_string=data
                )
        except (OSError, ValueError, SyntaxError):  # missing, unreadable or not an image: try the next
            continue
    return None


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def remove_earlier_exports(out_dir: Path) -> list[Path]:
    """Delete the event files an earlier export wrote in `out_dir` (ours only: they end in
    FILE_SUFFIX), so that TensorBoard, which reads every file in a folder, sees each point once."""
    removed = []
    for f in sorted(out_dir.glob(f"events.out.tfevents.*{FILE_SUFFIX}")):
        try:
            f.unlink()
            removed.append(f)
        except FileNotFoundError:
            pass
    return removed


def for_training(run_dir: Path, events_file: Path, out_dir: Path | None = None) -> TensorBoardExport:
    """The writer of a run that writes TensorBoard files as it goes (`train --tensorboard`), made
    before the run's first event: it starts with the events already in the file (a resumed run's
    earlier part), so the folder holds the whole run, as `export-tb` would write it."""
    writer = TensorBoardExport(run_dir, out_dir)
    if events_file.is_file():
        writer.write_all(read_events(events_file))
    return writer


def events_path(run: str | os.PathLike) -> tuple[Path, Path]:
    """(run directory, events file) for a run directory or its events `.jsonl` path."""
    p = Path(run)
    if p.suffix == ".jsonl" and not p.is_dir():
        return p.parent, p
    return p, p / EVENTS_FILE


def export(
    run: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    follow: bool = False,
    poll: float = 0.5,
    stop: threading.Event | Callable[[], bool] | None = None,
) -> ExportCounts:
    """Write a run's events as TensorBoard files; with `follow`, keep reading a live run until its
    `end` event (or `stop`), the files flushed every few seconds. The counts of what was written."""
    run_dir, path = events_path(run)
    with TensorBoardExport(run_dir, out_dir, flush_secs=2 if follow else 120) as tb:
        for event in read_events(path, follow=follow, poll=poll, stop=stop):
            tb.write(event)
        tb.flush()
        return tb.counts
