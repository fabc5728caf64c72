"""Run events: what a training run reports, and the `events.jsonl` file that carries them.

Every event is a flat JSON object with `time` (Unix seconds), `kind` and `step`. Kinds:
`start` (config, parameter count, data summary), `train` (loss, nll, bpd, logdet, lr,
grad_norm, images_per_s, memory), `eval` (held-out bpd; a variational run's bound, with `bpd_uniform`
and `dequant`), `sample` (image path), `checkpoint`
(path), `warning` (message) and `end` (status finished / interrupted / failed, reason).
`events.jsonl` is appended one line per event and flushed, so a viewer can follow a live run;
`read_events` tolerates a half-written last line.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

KINDS = ("start", "train", "eval", "sample", "checkpoint", "warning", "end")
EVENTS_FILE = "events.jsonl"

Emit = Callable[[dict], None]


def make_event(kind: str, step: int, **fields: Any) -> dict[str, Any]:
    """A new event dict stamped with the current time."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r} (expected one of {', '.join(KINDS)})")
    return {"time": time.time(), "kind": kind, "step": int(step), **fields}


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("nan", "inf"), paths strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def dumps(event: dict) -> str:
    return json.dumps(_clean(event), separators=(",", ":"), allow_nan=False, default=str)


class JsonlSink:
    """Appends events to a `.jsonl` file, one line each, flushed as it happens."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if _ends_mid_line(self.path):  # a killed writer's last line: end it, so ours start on lines of their own
            self._file.write("\n")
            self._file.flush()
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        line = dumps(event) + "\n"
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                try:
                    os.fsync(self._file.fileno())
                except OSError:
                    pass
                self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline (a half-written line)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def fanout(*sinks: Emit | None) -> Emit:
    """One callback calling every non-None sink in order."""
    active = [s for s in sinks if s is not None]

    def emit(event: dict) -> None:
        for s in active:
            s(event)

    return emit


def stopped(stop: threading.Event | Callable[[], bool] | None) -> bool:
    """Whether `stop` (an Event, a callable or None) asks to stop now."""
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def read_events(
    path: str | os.PathLike,
    follow: bool = False,
    *,
    poll: float = 0.2,
    stop: threading.Event | Callable[[], bool] | None = None,
    until_end: bool = True,
) -> Iterator[dict]:
    """Yield the events of a `.jsonl` file in order.

    Lines that are not valid JSON objects are skipped. A last line without its newline is a
    write in progress: with `follow` it is completed by later reads; without `follow` it is
    yielded only if it parses. With `follow`, waits for new lines (checking every `poll`
    seconds, also for the file to appear) until `stop` is set or returns true, or (with
    `until_end`) after an `end` event.
    """
    path = Path(path)
    while follow and not path.exists():
        if stopped(stop):
            return
        time.sleep(poll)
    with open(path, "rb") as f:
        buf = b""
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    event = _parse(raw)
                    if event is not None:
                        yield event
                        if follow and until_end and event.get("kind") == "end":
                            return
                continue
            if not follow:
                if buf.strip():
                    event = _parse(buf)
                    if event is not None:
                        yield event
                return
            if stopped(stop):
                return
            time.sleep(poll)


def _parse(raw: bytes) -> dict | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) and "kind" in obj else None


def last_event(path: str | os.PathLike, kind: str | None = None) -> dict | None:
    """The last event (of `kind`, when given) in a finished or live file, or None."""
    found = None
    for e in read_events(path):
        if kind is None or e.get("kind") == kind:
            found = e
    return found


def grid_candidates(run_dir: Path, path: str) -> list[Path]:
    """Where a `sample` event's grid may be, the run directory first: relative to it, in its samples/,
    then as given. Every reader of a run uses this rule (the dashboard, the TensorBoard export): a
    copied or moved run's events still name the original run's files, which may be gone or differ."""
    p = Path(path)
    inside = run_dir / "samples" / p.name
    if p.is_absolute():
        return [inside, p]
    return [run_dir / p, inside, p]
