"""Following a run's `events.jsonl`: a poll-driven tailer with no Textual in it.

`EventTail.poll()` reads whatever is new since the last call and returns it as a `TailRead`:
the complete lines parsed into events, one sentence per line that is not a JSON object, and
whether the file was truncated or replaced (then the caller starts over from the events in the
read, which come from the first line again). It never waits: the dashboard calls it from a
worker thread (see `app.DashboardApp._follow`), so a slow disk delays the numbers, never the
screen.

What it copes with:
- a run directory or file that does not exist yet (`TailRead.state` says which; polled again);
- a half-written last line (kept until its newline arrives; a last line that parses and stays
  unchanged for `settle` seconds is taken as is, for writers that never end it);
- a truncated file (size below what was read) or a replaced one (new inode, or its first bytes
  changed), e.g. a run directory reused or a log rotated: `reset` is set and reading restarts;
- a huge finished file: read in chunks of `chunk` bytes, so the first screen comes quickly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tarflow_core.events import EVENTS_FILE

# states of the followed file
MISSING_DIR = "missing-dir"
MISSING_FILE = "missing-file"
READING = "reading"


@dataclass
class TailRead:
    """What one poll found."""

    events: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problems_at: list[int] = field(default_factory=list)  # per problem: how many `events` came before it
    reset: str | None = None  # why reading started over (None: it did not)
    state: str = READING
    more: bool = False  # a chunk limit was hit: poll again at once


def resolve_events_path(run: str | os.PathLike) -> tuple[Path, Path]:
    """(run directory, events file) for a run directory or an events `.jsonl` path."""
    p = Path(run)
    if p.suffix == ".jsonl" and not p.is_dir():
        return p.parent, p
    return p, p / EVENTS_FILE


class EventTail:
    """Reads `events.jsonl` incrementally; call `poll()` repeatedly (one thread at a time)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        chunk: int = 1 << 20,
        settle: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = Path(path)
        self.chunk = chunk
        self.settle = settle
        self.clock = clock
        self._file = None
        self._ino: int | None = None
        self._offset = 0  # bytes consumed (complete lines, or a settled last line)
        self._buf = b""  # bytes read past _offset: a partial last line
        self._head = b""  # the file's first bytes as first read, to notice a rewrite
        self._partial_since: float | None = None
        self._line_no = 0

    # ------------------------------------------------------------------------------ public
    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def poll(self) -> TailRead:
        read = TailRead()
        if self._file is None:
            if not self._open(read):
                return read
        else:
            why = self._replaced()
            if why:
                self._restart(read, why)
                if not self._open(read):
                    return read
        self._read(read)
        return read

    # ----------------------------------------------------------------------------- helpers
    def _open(self, read: TailRead) -> bool:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            read.state = MISSING_FILE if self.path.parent.is_dir() else MISSING_DIR
            return False
        except (IsADirectoryError, PermissionError, OSError) as e:
            read.state = MISSING_FILE
            read.problems.append(f"cannot read {self.path}: {e.strerror or e}")
            return False
        self._file = f
        self._ino = os.fstat(f.fileno()).st_ino
        self._offset = 0
        self._buf = b""
        self._head = b""
        self._partial_since = None
        self._line_no = 0
        return True

    def _restart(self, read: TailRead, why: str) -> None:
        self.close()
        read.reset = why
        read.events.clear()
        read.problems.clear()
        read.problems_at.clear()

    def _replaced(self) -> str | None:
        """Why the open file is no longer the one at `path` (None: it still is)."""
        assert self._file is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None  # moved away and not recreated yet: keep the open one
        except OSError:
            return None
        if st.st_ino != self._ino:
            return "the events file was replaced"
        if st.st_size < self._offset + len(self._buf):
            return "the events file was truncated"
        if self._head:
            try:
                self._file.seek(0)
                head = self._file.read(len(self._head))
            except OSError:
                return None
            finally:
                self._file.seek(self._offset + len(self._buf))
            if head != self._head:
                return "the events file was rewritten"
        return None

    def _read(self, read: TailRead) -> None:
        assert self._file is not None
        self._file.seek(self._offset + len(self._buf))
        try:
            data = self._file.read(self.chunk)
        except OSError as e:
            read.problems.append(f"cannot read {self.path}: {e.strerror or e}")
            return
        if len(data) == self.chunk:
            read.more = True
        if data:
            if len(self._head) < 256:
                # remember the first bytes (read once; a rewrite changes them)
                start = self._offset + len(self._buf)
                if start < 256:
                    self._head = (self._head + data[: 256 - start])[:256]
            self._partial_since = None
            buf = self._buf + data
            *lines, rest = buf.split(b"\n")
            for raw in lines:
                self._offset += len(raw) + 1
                self._line_no += 1
                self._take(raw, read)
            self._buf = rest
            if rest:
                self._partial_since = self.clock()
        elif self._buf and self._partial_since is not None:
            # a last line without its newline: take it once it parses and has settled
            if self.clock() - self._partial_since >= self.settle and _parse(self._buf)[0] is not None:
                raw, self._buf = self._buf, b""
                self._offset += len(raw)
                self._line_no += 1
                self._partial_since = None
                self._take(raw, read)

    def _take(self, raw: bytes, read: TailRead) -> None:
        event, problem = _parse(raw)
        if event is not None:
            read.events.append(event)
        elif problem:
            read.problems.append(f"{self.path.name} line {self._line_no}: {problem}")
            read.problems_at.append(len(read.events))


def _parse(raw: bytes) -> tuple[dict | None, str | None]:
    """(event, None), or (None, why the line is not an event); (None, None) for a blank line."""
    text = raw.strip()
    if not text:
        return None, None
    try:
        obj = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError:
        shown = text[:40].decode("utf-8", "replace")
        more = "…" if len(text) > 40 else ""
        return None, f"not valid JSON: {shown}{more}"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, found {type(obj).__name__}"
    if "kind" not in obj:
        return None, "an object without a `kind`"
    return obj, None
