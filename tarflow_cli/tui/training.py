"""`tarflow train --ui tui`: training in a worker thread, the dashboard in the foreground.

    result = run_training_dashboard(run_dir, lambda stop: core_train(cfg, stop=stop))

Why a thread rather than a subprocess: the training function, its config object and its
return value stay in this process (no re-parsing of options, exceptions arrive as they are),
and torch releases the GIL in its kernels, so the UI stays responsive; the dashboard still
reads the run only through `events.jsonl`, exactly as `tarflow watch` does from elsewhere.

Keys: `s` and ctrl+c set the `stop` event (the trainer finishes its step, saves a checkpoint and
writes `end`); `q` while training asks first, then stops the run and quits once it has ended.
SIGTERM sets `stop` too. After the dashboard closes, a training thread that is still running
is asked to stop and waited for (a second ctrl+c stops waiting and raises KeyboardInterrupt).
What the training function returned is returned; what it raised is raised again here.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .messages import TrainingDone

T = TypeVar("T")


class TrainingOwner:
    """The dashboard's handle on training that runs in this process (`owner` of `make_app`)."""

    def __init__(self, start_training: Callable[[threading.Event], Any]):
        self.start_training = start_training
        self.stop = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self._app = None
        self._offset = 0

    def request_stop(self, signal_name: str | None = None) -> None:
        """Stop the run; `signal_name` (SIGTERM) is what its end event names instead of the user."""
        if signal_name and not self.stop.is_set():
            self.stop.signal_name = signal_name  # read by the trainer's `stop_reason`
        self.stop.set()

    def attach(self, app) -> None:
        """Called by the app once it runs: start the training thread."""
        self._app = app
        if app is not None:
            try:  # a resumed run appends: only what is written from now on counts
                self._offset = os.path.getsize(app.events_path)
            except OSError:
                self._offset = 0
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="tarflow-train", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        error_text, started = None, True
        try:
            self.result = self.start_training(self.stop)
        except BaseException as e:  # re-raised in the main thread after the UI closes
            self.error = e
            error_text = _describe(e)
            app = self._app
            started = app is None or _has_start(app.events_path, self._offset)
        finally:
            self.done.set()
            app = self._app
            if app is not None:
                try:
                    app.post_message(TrainingDone(error_text, started))
                except Exception:
                    pass

    def wait(self, poll: float = 0.2) -> None:
        """Block until the training thread ends (KeyboardInterrupt still gets through)."""
        while self.thread is not None and self.thread.is_alive():
            self.thread.join(poll)


def _has_start(events_path: Path, offset: int) -> bool:
    """Whether a `start` event was written after `offset` (this thread may read the disk)."""
    try:
        with open(events_path, "rb") as f:
            f.seek(offset)
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return False
    for raw in lines:
        try:
            if json.loads(raw).get("kind") == "start":
                return True
        except (ValueError, AttributeError):
            continue
    return False


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if type(e).__name__ in ("SetupError", "TrainError", "ConfigError", "UsageError"):
        return text
    return f"{type(e).__name__}: {text}"


def run_training_dashboard(
    run_dir: str | Path,
    start_training: Callable[[threading.Event], T],
    *,
    poll: float = 0.25,
    app_factory: Callable[..., Any] | None = None,
) -> T:
    """Run `start_training(stop_event)` in a worker thread with the dashboard for `run_dir` in front.

    `run_dir` must be the directory the training writes `events.jsonl` to (resolve the default
    name before calling). Returns what `start_training` returned; re-raises what it raised.
    `app_factory` (default `make_app`) is for tests.
    """
    from .app import make_app
    from .graphics import pick_graphics

    owner = TrainingOwner(start_training)
    if app_factory is None:
        app = make_app(run_dir, owner=owner, poll=poll, graphics=pick_graphics()[0])
    else:
        app = app_factory(run_dir, owner=owner, poll=poll)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, lambda signum, frame: owner.request_stop("SIGTERM"))
    try:
        try:
            app.run()
        except KeyboardInterrupt:  # ctrl+c before the terminal was in raw mode: like `s`
            owner.request_stop()
        if owner.thread is None:  # the app never started (no terminal?): train without it
            owner.attach(None)
        if not owner.done.is_set():
            owner.request_stop()
            print(
                f"stopping the run in {run_dir}: finishing the step and saving a checkpoint "
                "(ctrl+c again to abandon it)",
                file=sys.stderr,
                flush=True,
            )
        owner.wait()
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if owner.error is not None:
        raise owner.error
    return owner.result
