"""`train --ui tui` plumbing: training in a worker thread, the dashboard in front, `s` stops it."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from tarflow_cli.tui.app import DashboardApp, make_app
from tarflow_cli.tui.training import TrainingOwner, run_training_dashboard
from tarflow_core.events import JsonlSink, make_event

from .helpers import header_text, log_text, run_async, wait_until


def fake_training(run_dir, *, steps: int | None = None, fail: str | None = None):
    """A stand-in for tarflow_core.train.train: writes events until `stop` (or `steps`)."""

    def start(stop: threading.Event):
        with JsonlSink(run_dir / "events.jsonl") as emit:
            emit(make_event("start", 0, total_steps=1000, device="cpu"))
            step = 0
            while not stop.is_set():
                step += 1
                emit(make_event("train", step, loss=1.0 / step, bpd=8.0 - step * 0.01, lr=1e-3, images_per_s=100.0))
                if fail and step == 3:
                    raise RuntimeError(fail)
                if steps and step >= steps:
                    emit(make_event("end", step, status="finished", reason=f"reached step {step}"))
                    return ("finished", step)
                time.sleep(0.01)
            emit(make_event("checkpoint", step, path=str(run_dir / "checkpoints" / f"step-{step}")))
            emit(make_event("end", step, status="interrupted", reason="stopped by the user"))
            return ("interrupted", step)

    return start


@run_async
async def test_s_stops_the_owned_run_and_the_result_comes_back(tmp_path):
    owner = TrainingOwner(fake_training(tmp_path))
    app = make_app(tmp_path, owner=owner, poll=0.02, tick=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.step >= 5, what="training steps")
        assert owner.thread is not None and owner.thread.name == "tarflow-train"
        assert "RUNNING" in header_text(app)
        await pilot.press("s")
        await wait_until(pilot, lambda: app.state.status == "interrupted", what="end event")
        await wait_until(pilot, lambda: app._owner_done, what="training returned")
        assert owner.result[0] == "interrupted" and "checkpoint saved" in log_text(app)
        assert app.is_running  # the final state stays on screen until q
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


@run_async
async def test_training_exception_shows_as_failed(tmp_path):
    owner = TrainingOwner(fake_training(tmp_path, fail="CUDA error: device lost"))
    app = make_app(tmp_path, owner=owner, poll=0.02, tick=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.status == "failed", what="failure")
        assert "device lost" in header_text(app) and "device lost" in log_text(app)
    assert isinstance(owner.error, RuntimeError)


def _headless_factory(**flags):
    """make_app, run headless (no terminal in tests), quitting once the training returns."""

    def factory(run_dir, *, owner, poll):
        app = make_app(run_dir, owner=owner, poll=poll, tick=None)
        app._quit_when_done = True
        app.run = functools.partial(DashboardApp.run, app, headless=True)
        return app

    return factory


def test_run_training_dashboard_returns_the_result(tmp_path):
    result = run_training_dashboard(
        tmp_path, fake_training(tmp_path, steps=20), poll=0.02, app_factory=_headless_factory()
    )
    assert result == ("finished", 20)
    assert '"kind":"end"' in (tmp_path / "events.jsonl").read_text()


def test_run_training_dashboard_reraises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        run_training_dashboard(
            tmp_path, fake_training(tmp_path, fail="boom"), poll=0.02, app_factory=_headless_factory()
        )


def test_closing_the_dashboard_stops_a_running_training(tmp_path):
    class QuitSoon(DashboardApp):
        def on_mount(self) -> None:
            self.set_timer(0.5, self.exit)  # the user quits while training goes on

    def factory(run_dir, *, owner, poll):
        app = QuitSoon(run_dir, owner=owner, poll=poll, tick=None)
        app.run = functools.partial(DashboardApp.run, app, headless=True)
        return app

    status, step = run_training_dashboard(tmp_path, fake_training(tmp_path), poll=0.02, app_factory=factory)
    assert status == "interrupted" and step > 0


def test_a_run_that_fails_before_starting_closes_the_dashboard(tmp_path):
    def bad_setup(stop):
        raise ValueError("--data ./nowhere: no such folder")

    def factory(run_dir, *, owner, poll):
        app = make_app(run_dir, owner=owner, poll=poll, tick=None)
        app.run = functools.partial(DashboardApp.run, app, headless=True)
        return app

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="no such folder"):
        run_training_dashboard(tmp_path / "run", bad_setup, poll=0.02, app_factory=factory)
    assert time.monotonic() - t0 < 10


def test_a_sigterm_stop_is_named_in_the_stop_the_trainer_reads():
    """train --ui tui: SIGTERM's stop says so (the end event then says 'stopped by SIGTERM'); `s` is the user's."""
    from tarflow_core.train.signals import stop_reason

    owner = TrainingOwner(lambda stop: None)
    owner.request_stop("SIGTERM")
    assert owner.stop.is_set() and stop_reason(owner.stop) == "stopped by SIGTERM"
    by_key = TrainingOwner(lambda stop: None)
    by_key.request_stop()
    assert stop_reason(by_key.stop) == "stopped by the user"
