"""Ctrl-C and SIGTERM: the first asks the run to finish its step, checkpoint and end."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

StopLike = threading.Event | Callable[[], bool] | None


class SignalStop(threading.Event):
    """The stop request of `stop_on_signals`, knowing which signal made it (None: none yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.signal_name: str | None = None


def stop_reason(stop: StopLike) -> str:
    """How the end event words a requested stop: Ctrl-C and the dashboard's stop key are the user's;
    another signal (a scheduler's or `kill`'s SIGTERM) is named, not put on the user."""
    name = getattr(stop, "signal_name", None)
    return f"stopped by {name}" if name and name != "SIGINT" else "stopped by the user"


@contextlib.contextmanager
def stop_on_signals(
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), echo_window: float | None = None
) -> Iterator[SignalStop]:
    """An Event set by the first SIGINT/SIGTERM (the run then finishes its step, checkpoints and
    ends); a second one raises KeyboardInterrupt. Outside the main thread it only yields an Event.

    Under torchrun a Ctrl-C (or a scheduler's SIGTERM to the job) reaches each worker twice: from
    the terminal and, a moment later, forwarded by the launcher. A repeat of the same signal
    within `echo_window` seconds (default: 1 s in a distributed run, else 0) is taken as that
    echo, not as a second request, so the workers still save their checkpoint."""
    event = SignalStop()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    if echo_window is None:
        echo_window = 1.0 if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0.0
    first: list[tuple[int, float]] = []

    def handler(signum, frame):  # noqa: ARG001
        now = time.monotonic()
        if event.is_set():
            if first and first[0][0] == signum and now - first[0][1] < echo_window:
                return
            raise KeyboardInterrupt
        first.append((signum, now))
        event.signal_name = signal.Signals(signum).name
        event.set()

    old = {}
    for s in signals:
        old[s] = signal.signal(s, handler)
    try:
        yield event
    finally:
        for s, h in old.items():
            signal.signal(s, h)
