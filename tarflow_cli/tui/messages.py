"""Messages that worker threads post to the dashboard (dataclasses; workers never touch widgets).

Each carries the `generation` of the reading it belongs to: `r` (reload) starts a new one, and
anything still in flight from the old one is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual.message import Message


@dataclass
class EventsRead(Message):
    """New events (in file order) and sentences about lines that were not events."""

    generation: int
    events: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    reset: str | None = None  # the file was truncated or replaced: start over first
    problems_at: list[int] | None = None  # per problem: how many `events` precede it (None: all)


@dataclass
class SourceState(Message):
    """Where the followed file stands: missing-dir, missing-file or reading. Replaceable."""

    generation: int
    state: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SourceState)


@dataclass
class SampleLoaded(Message):
    """A sample grid read from disk: `image` is an RGB PIL image, or None and `error` says why;
    `tiles` its images cut out (a `widgets.sample_view.Tiles`), None when it is not a grid."""

    path: Path
    image: Any = None
    error: str | None = None
    tiles: Any = None


@dataclass
class TrainingDone(Message):
    """The training this dashboard owns has returned (`error`: what it raised, if it did;
    `started`: whether it had written its `start` event)."""

    error: str | None = None
    started: bool = True
