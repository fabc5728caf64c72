"""The dashboard on real training runs: `tarflow train --preset tiny` in another process, and
the core trainer in this process's worker thread (what `train --ui tui` does)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tarflow_cli.tui.app import make_app
from tarflow_cli.tui.training import TrainingOwner
from tarflow_cli.tui.widgets.sample_view import SampleView

from .helpers import header_text, log_text, run_async, screen_text, wait_until

ROOT = Path(__file__).resolve().parents[2]
HAS_TRAIN = (
    importlib.util.find_spec("tarflow_core.train") is not None
    and importlib.util.find_spec("tarflow_cli.commands.train") is not None
)
needs_train = pytest.mark.skipif(not HAS_TRAIN, reason="tarflow train is not there yet")

# a very small run: seconds on a CPU
SMALL = (
    "--preset tiny --width 16 --blocks 2 --layers-per-block 1 --head-dim 8 --batch-size 16 "
    "--log-every 2 --eval-every 4 --sample-every 4 --eval-images 16 --num-samples 4 --device cpu"
).split()


@needs_train
@run_async
async def test_watch_a_real_tiny_run_in_another_process(tmp_path):
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tarflow_cli",
            "train",
            *SMALL,
            "--max-steps",
            "8",
            "--run-dir",
            str(run),
            "--ui",
            "plain",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        app = make_app(run, poll=0.05, tick=None)  # attached before the run directory exists
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(
                pilot, lambda: app.state.status not in ("waiting", "running"), timeout=240, what="the run to end"
            )
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert app.state.status == "finished" and app.state.step == 8
            assert app.state.params and app.state.device == "cpu" and app.state.max_steps == 8
            assert len(app.state.series["bpd"]) == 4 and len(app.state.series["eval_bpd"]) == 2
            view = app.query_one(SampleView)
            await wait_until(
                pilot, lambda: view.current is not None and view.current.path in view._images, what="the sample grid"
            )
            assert view.current.step == 8 and view._tiles[view.current.path] is not None
            await pilot.pause(0.1)
            assert "FINISHED" in header_text(app) and "step 8/8" in screen_text(app)
            assert "run finished" in log_text(app)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_train
@run_async
async def test_core_training_in_the_dashboard_thread_stops_on_s(tmp_path):
    from tarflow_core.presets import preset
    from tarflow_core.train import train as core_train

    cfg = preset("tiny").replace(
        width=16,
        num_blocks=2,
        layers_per_block=1,
        head_dim=8,
        batch_size=16,
        log_every=1,
        eval_every=0,
        sample_every=0,
        checkpoint_every=0,
        max_steps=100000,
        device="cpu",
        run_dir=str(tmp_path / "run"),
    )
    owner = TrainingOwner(lambda stop: core_train(cfg, stop=stop))
    app = make_app(tmp_path / "run", owner=owner, poll=0.05, tick=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.step >= 2, timeout=240, what="training steps")
        await pilot.press("s")
        await wait_until(pilot, lambda: app._owner_done, timeout=120, what="the training to return")
        await wait_until(pilot, lambda: app.state.status == "interrupted", what="the end event")
        assert owner.error is None and owner.result.status == "interrupted"
        assert owner.result.checkpoint is not None and Path(owner.result.checkpoint).is_dir()
        assert "checkpoint saved" in log_text(app)
