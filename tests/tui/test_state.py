"""Folding events into what the dashboard shows: tolerant of missing and unknown fields."""

from __future__ import annotations

from tarflow_cli.tui.state import RunState, format_bytes, format_duration

T0 = 1000.0

# shaped like tarflow_core.train's events
START = {
    "time": T0,
    "kind": "start",
    "step": 0,
    "config": {"preset": "tiny", "max_steps": 30, "batch_size": 64},
    "parameters": 409888,
    "device": "cpu",
    "precision": "fp32",
    "total_steps": 30,
    "steps_per_epoch": 23,
    "data": {
        "channels": 1,
        "image_size": 8,
        "num_classes": 10,
        "source": "digits",
        "train": "digits (1500 train images, 1x8x8, 10 classes)",
        "train_images": 1500,
    },
}


def train(step, t, **kw):
    return {
        "time": t,
        "kind": "train",
        "step": step,
        "loss": 0.3,
        "nll": 1.2,
        "bpd": 8.8,
        "lr": 1e-3,
        "images_per_s": 60.0,
        "memory_mb": 388.7,
        "epoch": step / 23,
        **kw,
    }


def test_start_train_eval_end():
    s = RunState("runs/x")
    assert s.status == "waiting"
    s.apply(START)
    assert s.status == "running" and s.max_steps == 30 and s.params == 409888 and s.device == "cpu"
    assert s.steps_per_epoch == 23 and s.image_size == 8
    assert "digits" in s.data and "1,500 images" in s.data
    s.apply(train(5, T0 + 10))
    s.apply(train(10, T0 + 20))
    assert s.step == 10 and s.series["bpd"].values == [8.8, 8.8] and s.memory == "388.7 MiB"
    assert abs(s.epoch - 10 / 23) < 1e-9
    assert abs(s.steps_per_second() - 0.5) < 1e-9
    assert abs(s.eta(now=T0 + 20) - 40.0) < 1e-9
    assert s.elapsed(now=T0 + 25) == 25
    s.apply({"time": T0 + 21, "kind": "eval", "step": 10, "bpd": 7.9})
    assert s.series["eval_bpd"].values == [7.9]
    s.apply({"time": T0 + 30, "kind": "end", "step": 10, "status": "interrupted", "reason": "stopped by the user"})
    assert s.status == "interrupted" and s.end_reason == "stopped by the user"
    assert s.elapsed(now=T0 + 999) == 30 and s.eta(now=T0 + 40) is None
    assert "run interrupted: stopped by the user" in s.log[-1].text


def test_missing_unknown_and_junk_fields():
    s = RunState("r")
    s.apply({"kind": "start"})
    s.apply({"kind": "train", "step": 1, "bpd": "nan", "loss": None, "lr": "x", "whatever": [1]})
    s.apply({"kind": "mystery", "step": 2})
    s.apply({"kind": "train"})
    s.apply({"kind": "sample", "step": 3})
    s.apply({"kind": "warning", "step": 3})
    s.apply({"kind": "end", "status": "weird"})
    assert s.status == "finished" and all(len(v) == 0 for v in s.series.values())
    assert s.warnings == 1 and s.samples == []


def test_resume_cuts_points_after_the_checkpoint():
    s = RunState("r")
    s.apply(START)
    for step in (5, 10, 15, 20):
        s.apply(train(step, T0 + step))
    s.apply({"time": T0 + 30, "kind": "end", "step": 20, "status": "interrupted"})
    s.apply({**START, "time": T0 + 100, "step": 15, "resumed_from": 15})
    assert s.status == "running" and s.step == 15 and s.series["bpd"].steps == [5, 10, 15]
    assert "resumed at step 15" in s.log[-1].text
    s.apply(train(20, T0 + 105))
    assert s.series["bpd"].steps == [5, 10, 15, 20]


def test_sample_paths():
    s = RunState("/runs/a")
    s.apply({"kind": "sample", "step": 5, "path": "/elsewhere/runs/a/samples/step-5.png", "num": 16})
    s.apply({"kind": "sample", "step": 10, "path": "samples/step-10.png"})
    a, b = s.samples
    assert a.num == 16 and [str(p) for p in a.candidates(s.run_dir)] == [
        "/runs/a/samples/step-5.png",
        "/elsewhere/runs/a/samples/step-5.png",
    ]
    assert str(b.candidates(s.run_dir)[0]) == "/runs/a/samples/step-10.png"


def test_formatting():
    assert format_duration(59) == "0:59" and format_duration(3725) == "1:02:05"
    assert format_duration(None) == "–"
    assert format_bytes(1536) == "2 KiB" and format_bytes(3 * 2**30) == "3.0 GiB"


def test_elapsed_after_a_resume_is_the_runs_total_and_the_session_is_told_apart():
    """Interrupted after 30 s, resumed an hour later for 20 s: 50 s in all, 20 s this session; a
    session that ended without an end event counts to its last event."""
    s = RunState("runs/x")
    s.apply(START)
    s.apply({"time": T0 + 30, "kind": "end", "step": 10, "status": "interrupted", "reason": "stopped by the user"})
    s.apply({**START, "time": T0 + 3600, "step": 10, "resumed_from": "checkpoints/step-00000010"})
    assert s.elapsed(now=T0 + 3620) == 50 and s.session_elapsed(now=T0 + 3620) == 20
    s.apply({"time": T0 + 3625, "kind": "train", "step": 20, "loss": 1.0})  # then killed: no end event
    s.apply({**START, "time": T0 + 7200, "step": 20, "resumed_from": "checkpoints/step-00000020"})
    assert s.elapsed(now=T0 + 7210) == 30 + 25 + 10 and s.session_elapsed(now=T0 + 7210) == 10


def test_the_header_shows_the_total_and_this_sessions_time_after_a_resume():
    from tarflow_cli.tui.widgets.run_header import _details_line

    s = RunState("runs/x")
    s.apply(START)
    s.apply({"time": T0 + 30, "kind": "end", "step": 10, "status": "interrupted", "reason": "stopped by the user"})
    assert f"elapsed {format_duration(30)}  " in _details_line(s, T0 + 40, 60, 0).plain
    s.apply({**START, "time": T0 + 3600, "step": 10, "resumed_from": "checkpoints/step-00000010"})
    line = _details_line(s, T0 + 3620, 60, 0).plain
    assert f"elapsed {format_duration(50)} ({format_duration(20)} this session)" in line, line
