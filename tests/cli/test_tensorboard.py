"""`tarflow export-tb` and tarflow_core.tensorboard: a run's events as TensorBoard files, read
back with TensorBoard's own reader."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.tui.canned import T0, append, make_run, start_event, train_event, write_grid

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from tarflow_cli.main import app  # noqa: E402
from tarflow_core import tensorboard as tb  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def read_back(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})  # 0: keep every point
    acc.Reload()
    return acc


def series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(s.step, s.value) for s in acc.Scalars(tag)]


def finished_run(tmp_path: Path) -> Path:
    """The canned run (train every 10 steps to 600, eval every 100, grids at 200/400/600), one
    more train event with the TFLOP/s the trainer reports, and its end."""
    run = make_run(tmp_path, steps=600)
    extra = {**train_event(610), "tflops": 0.25, "memory_mb": 512.0}
    end = {"time": T0 + 40, "kind": "end", "step": 610, "status": "finished", "reason": "reached --max-steps 610"}
    append(run, extra, end)
    return run


def test_export_writes_the_scalars_and_grids_tensorboard_reads(tmp_path):
    run = finished_run(tmp_path)
    r = CliRunner().invoke(app, ["export-tb", str(run)])
    assert r.exit_code == 0, r.output
    out = run / "tensorboard"
    assert r.stdout.strip() == str(out)
    assert "3 sample grid(s)" in r.stderr and f"tensorboard --logdir {out}" in r.stderr
    acc = read_back(out)
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/bpd", "eval/bpd", "train/lr", "train/grad_norm", "speed/images_per_s"}
    assert expected | {"speed/tflops"} <= tags
    steps = list(range(10, 611, 10))
    for tag, name in (("train/bpd", "bpd"), ("train/loss", "loss"), ("train/lr", "lr")):
        points = series(acc, tag)
        assert [s for s, _ in points] == steps
        assert [v for _, v in points] == pytest.approx([train_event(s)[name] for s in steps], rel=1e-6)
    assert series(acc, "speed/tflops") == [(610, 0.25)]
    held_out = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    held_out = [(e["step"], e["bpd"]) for e in held_out if e["kind"] == "eval"]
    got = series(acc, "eval/bpd")
    assert [s for s, _ in got] == [s for s, _ in held_out] == [100, 200, 300, 400, 500, 600]
    assert [v for _, v in got] == pytest.approx([v for _, v in held_out], rel=1e-6)
    assert [s.wall_time for s in acc.Scalars("train/bpd")][:2] == pytest.approx([T0 + 0.5, T0 + 1.0])
    images = acc.Images("samples")
    assert [i.step for i in images] == [200, 400, 600]
    grid = run / "samples" / "step000400.png"
    assert images[1].encoded_image_string == grid.read_bytes()
    from PIL import Image

    with Image.open(grid) as img:
        assert (images[1].width, images[1].height) == img.size


def test_exporting_again_replaces_the_files_instead_of_doubling_points(tmp_path):
    run = finished_run(tmp_path)
    out = tmp_path / "tb"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    for _ in range(2):
        r = CliRunner().invoke(app, ["export-tb", str(run / "events.jsonl"), "--out", str(out)])
        assert r.exit_code == 0, r.output
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert (out / "notes.txt").read_text() == "mine"  # not ours: left alone
    assert [s for s, _ in series(read_back(out), "train/bpd")] == list(range(10, 611, 10))


def test_a_resumed_run_shows_each_step_once(tmp_path):
    """A run resumed from its step-30 checkpoint repeats steps 40 and 50: TensorBoard keeps the
    resumed run's points past the checkpoint, not both."""
    run = tmp_path / "run"
    run.mkdir()
    first = [start_event()] + [train_event(s) for s in (10, 20, 30, 40, 50)]
    resumed = [start_event(step=30)] + [{**train_event(s), "bpd": 1.0 + s / 1000} for s in (40, 50, 60)]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in first + resumed))
    tb.export(run)
    points = series(read_back(run / "tensorboard"), "train/bpd")
    assert [s for s, _ in points] == [10, 20, 30, 40, 50, 60]
    assert [v for _, v in points][3:] == pytest.approx([1.04, 1.05, 1.06])
    assert points[2][1] == pytest.approx(train_event(30)["bpd"])


def test_a_copied_run_shows_its_own_grids(tmp_path):
    """The trainer names grids by absolute path; a copy whose original is gone finds its own."""
    original = tmp_path / "original"
    grid = write_grid(original / "samples" / "step-00000010.png")
    events = [start_event(), train_event(10), {"time": T0, "kind": "sample", "step": 10, "path": str(grid)}]
    (original / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    counts = tb.export(copy)
    assert counts.images == 1 and counts.missing_grids == []
    own = (copy / "samples" / grid.name).read_bytes()
    assert read_back(copy / "tensorboard").Images("samples")[0].encoded_image_string == own
    (copy / "samples" / grid.name).unlink()
    r = CliRunner().invoke(app, ["export-tb", str(copy)])
    assert r.exit_code == 0 and "1 sample grid(s) named by the events were not found" in r.stderr


def test_follow_writes_a_live_run_until_its_end(tmp_path):
    run = make_run(tmp_path, steps=50, samples=False)
    result = {}
    follower = threading.Thread(target=lambda: result.update(counts=tb.export(run, follow=True, poll=0.02)))
    follower.start()
    time.sleep(0.3)
    assert follower.is_alive()  # no end yet: still following
    append(run, train_event(60), {"time": T0 + 9, "kind": "end", "step": 60, "status": "finished", "reason": "done"})
    follower.join(timeout=30)
    assert not follower.is_alive()
    assert result["counts"].ended["status"] == "finished"
    assert [s for s, _ in series(read_back(run / "tensorboard"), "train/bpd")] == list(range(10, 61, 10))


def test_follow_stops_on_ctrl_c_with_exit_130_and_keeps_what_it_wrote(tmp_path):
    run = make_run(tmp_path, steps=100, samples=False)
    code = "import sys; sys.argv = ['tarflow', *sys.argv[1:]]\nfrom tarflow_cli.entry import main\nmain()"
    p = subprocess.Popen(
        [sys.executable, "-c", code, "export-tb", str(run), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 60
    while time.time() < deadline and "following" not in _peek(run):
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert [s for s, _ in series(read_back(run / "tensorboard"), "train/bpd")] == list(range(10, 101, 10))


def _peek(run: Path) -> str:
    """'following' once the exporter has opened its output file."""
    return "following" if list((run / "tensorboard").glob("events.out.tfevents.*")) else ""


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path):
    run = finished_run(tmp_path)
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"  # as if not installed
        "sys.argv = ['tarflow', 'export-tb', sys.argv[1]]\n"
        "from tarflow_cli.entry import main\nmain()"
    )
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tarflow[tensorboard]'" in lines[0], r.stderr
    assert not (run / "tensorboard").exists()


@pytest.mark.parametrize("layout", ["missing", "folder-of-runs", "file"])
def test_what_is_not_a_run_is_one_line(tmp_path, layout):
    if layout == "missing":
        target, needle = (
            tmp_path / "nothing",
            "has no events.jsonl yet (to wait for a run that is starting, add --follow)",
        )
    elif layout == "folder-of-runs":
        make_run(tmp_path / "runs")
        target, needle = tmp_path / "runs", "tarflow export-tb"
    else:
        target, needle = tmp_path / "model.pth", "is a file"
        target.write_text("x")
    r = CliRunner().invoke(app, ["export-tb", str(target)])
    assert r.exit_code == 2 and needle in " ".join(r.stderr.split()), r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_export_tb_starts_without_torch(tmp_path):
    run = finished_run(tmp_path)
    code = (
        f"import sys; sys.argv = ['tarflow', 'export-tb', {str(run)!r}]\n"
        "from tarflow_cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------------- train --tensorboard
SMALL = "--width 32 --head-dim 16 --blocks 2 --batch-size 16 --log-every 2 --num-samples 10 --device cpu --ui plain"


def train(run: Path, *more: str):
    args = ["train", *SMALL.split(), "--eval-every", "4", "--sample-every", "4", "--run-dir", str(run), *more]
    return CliRunner().invoke(app, args)


def everything(folder: Path) -> dict:
    """Every scalar series and image of a TensorBoard folder, as plain values."""
    acc = read_back(folder)
    found = {tag: [(s.step, s.wall_time, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    found["images"] = [(i.step, i.encoded_image_string) for i in acc.Images("samples")]
    return found


def test_train_writes_tensorboard_files_as_it_goes_and_across_a_resume(tmp_path):
    """`train --tensorboard`: the same files export-tb writes from the finished run's events, rank 0's
    writer fed as each event is emitted; a resume adds to them (each step once)."""
    run = tmp_path / "run"
    r = train(run, "--max-steps", "4", "--tensorboard")
    assert r.exit_code == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["train"]["tensorboard"] is True
    assert [s for s, _ in series(read_back(run / "tensorboard"), "train/bpd")] == [2, 4]
    r = CliRunner().invoke(app, ["train", "--resume", str(run), "--max-steps", "8", "--ui", "plain"])
    assert r.exit_code == 0, r.stderr
    live = everything(run / "tensorboard")
    assert {"train/loss", "train/bpd", "eval/bpd", "train/lr", "train/grad_norm", "speed/tflops"} <= set(live)
    assert [s for s, *_ in live["train/bpd"]] == [2, 4, 6, 8]
    assert [s for s, _ in live["images"]] == [4, 8]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    exported = CliRunner().invoke(app, ["export-tb", str(run), "--out", str(tmp_path / "tb")])
    assert exported.exit_code == 0, exported.stderr
    assert everything(tmp_path / "tb") == live


def test_train_tensorboard_without_the_package_is_a_usage_error(tmp_path):
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"  # as if not installed
        f"sys.argv = ['tarflow', 'train', *{SMALL.split()!r}, '--max-steps', '2', '--tensorboard', "
        "'--run-dir', sys.argv[1]]\n"
        "from tarflow_cli.entry import main\nmain()"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tensorboard" in lines[0] and "pip install 'tarflow[tensorboard]'" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_tensorboard_failure_is_a_warning_not_the_end_of_the_run(tmp_path, monkeypatch):
    def full_disk(self, event):
        if event["kind"] == "train":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tb.TensorBoardExport, "write", full_disk)
    run = tmp_path / "run"
    r = train(run, "--max-steps", "4", "--tensorboard")
    assert r.exit_code == 0, r.stderr
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    warnings = [e for e in events if e["kind"] == "warning" and e.get("reason") == "tensorboard"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]["message"]
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "finished"


def test_help_names_the_extra_and_the_default_folder():
    r = CliRunner().invoke(app, ["export-tb", "--help"], env={"COLUMNS": "200"})
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "pip install 'tarflow[tensorboard]'" in text and "RUN_DIR/tensorboard/" in text
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--tensorboard" in r.output and "RUN_DIR/tensorboard/" in " ".join(r.output.split())
