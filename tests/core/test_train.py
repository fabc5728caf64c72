"""tarflow_core.train: a real run on digits, events, checkpoints, exact resume, non-finite steps."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tarflow_core.checkpoint import load_checkpoint, load_model
from tarflow_core.config import ConfigError, TrainConfig, parse_noise
from tarflow_core.events import KINDS, read_events
from tarflow_core.model import TarFlow
from tarflow_core.presets import PRESETS, preset
from tarflow_core.sampling import generate
from tarflow_core.train import SetupError, TrainError, load_run_config, lr_at, resumable_checkpoints, train

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(run_dir, **kw) -> TrainConfig:
    base = dict(
        width=32,
        head_dim=16,
        num_blocks=2,
        layers_per_block=1,
        batch_size=16,
        max_steps=20,
        log_every=5,
        eval_every=10,
        sample_every=10,
        checkpoint_every=10,
        num_samples=10,
        eval_images=32,
        lr=3e-3,
        run_dir=str(run_dir),
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(ckpt_dir, name="model.safetensors"):
    return load_file(str(Path(ckpt_dir) / name))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ unit pieces


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1e-3, min_lr=1e-6, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(5, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(110, **kw) == pytest.approx(1e-6)
    assert lr_at(500, **kw) == pytest.approx(1e-6)
    seq = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(seq, seq[1:]))


def test_config_roundtrip_and_presets():
    for name, cfg in PRESETS.items():
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    p = preset("imagenet64-cond")
    assert (p.patch_size, p.width, p.num_blocks, p.layers_per_block, p.noise_std, p.batch_size, p.epochs, p.lr) == (
        2,
        768,
        8,
        8,
        0.05,
        256,
        200,
        1e-4,
    )
    assert preset("imagenet64").noise == "uniform" and preset("imagenet64").resolved_precision("cuda") == "fp32"
    assert preset("afhq256").resolved_precision("cuda") == "bf16"
    assert preset("afhq256").resolved_precision("cpu") == "fp32"
    assert (preset("imagenet128-cond").patch_size, preset("imagenet128-cond").width) == (4, 1024)
    assert preset("mnist").lr == 2e-3 and preset("mnist").batch_size == 256
    assert preset("tiny").data == "digits"
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="--width"):
        TrainConfig(width=50, head_dim=16)
    with pytest.raises(ConfigError, match="length"):
        TrainConfig(max_steps=None, epochs=None)
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({"bogus": 1})
    assert parse_noise("uniform") == ("uniform", None)
    assert parse_noise("gaussian:0.05") == ("gaussian", 0.05)
    with pytest.raises(ConfigError, match="--noise"):
        parse_noise("gaussian:abc")
    cfg = preset("tiny").replace(width=None, lr=1e-3)
    assert cfg.width == preset("tiny").width and cfg.lr == 1e-3


def test_options_are_declared_once_with_their_checks_and_resume_rule():
    """Validation and the resume rule come from the fields' declarations; messages name the
    command-line flags (`--blocks` for `num_blocks`)."""
    import dataclasses

    from tarflow_core.config import RESUME_CHANGEABLE, flag, option_spec

    assert RESUME_CHANGEABLE == {f.name for f in dataclasses.fields(TrainConfig) if option_spec(f).resume}
    assert {"lr", "min_lr", "grad_clip", "max_steps", "device"} <= RESUME_CHANGEABLE
    assert not {"num_blocks", "width", "seed", "data", "batch_size", "noise"} & RESUME_CHANGEABLE
    assert (flag("num_blocks"), flag("img_size"), flag("in_channels"), flag("flip")) == (
        "--blocks",
        "--image-size",
        "--channels",
        "--flip",
    )
    with pytest.raises(ConfigError, match=r"--blocks must be a positive integer \(got 0\)"):
        TrainConfig(num_blocks=0)
    with pytest.raises(ConfigError, match=r"--channels must be 1 or 3 \(got 2\)"):
        TrainConfig(in_channels=2)
    with pytest.raises(ConfigError, match=r"--image-size 9 must be a multiple of --patch-size 2"):
        TrainConfig(img_size=9)


# ------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """20 steps on digits, with one non-finite step (index 7) injected: it must be skipped."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    seen = []

    def hook(step, x, y):
        return (x * float("nan"), y) if step == 7 else (x, y)

    result = train(tiny_cfg(run_dir, max_steps=30, ema=0.9), emit=seen.append, batch_hook=hook)
    return run_dir, result, seen


def test_run_finishes_and_loss_decreases(tiny_run):
    run_dir, result, seen = tiny_run
    assert result.status == "finished" and result.step == 30 and result.exit_code == 0
    events = list(read_events(run_dir / "events.jsonl"))
    assert [e["kind"] for e in events] == [e["kind"] for e in seen]  # emit sees exactly what is written
    assert {e["kind"] for e in events} == set(KINDS)
    for e in events:
        assert isinstance(e["time"], float) and isinstance(e["step"], int)
    train_events = [e for e in events if e["kind"] == "train"]
    assert [e["step"] for e in train_events] == [5, 10, 15, 20, 25, 30]
    assert train_events[-1]["loss"] < train_events[0]["loss"] - 0.1
    for key in ("loss", "nll", "bpd", "logdet", "lr", "grad_norm", "images_per_s", "memory_mb"):
        assert math.isfinite(train_events[-1][key]), key
    start = events[0]
    assert start["kind"] == "start" and start["parameters"] > 0 and start["data"]["num_classes"] == 10
    assert start["config"]["width"] == 32
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30] and evals[-1]["bpd"] < evals[0]["bpd"]
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "finished"
    samples = [e for e in events if e["kind"] == "sample"]
    assert all(Path(e["path"]).is_file() for e in samples)
    assert (run_dir / "config.json").is_file()
    assert load_run_config(run_dir) == tiny_cfg(run_dir, max_steps=30, ema=0.9)


def test_nonfinite_step_is_skipped_and_reported(tiny_run):
    run_dir, _, _ = tiny_run
    warnings = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["step"] == 8 and "non-finite" in warnings[0]["message"]


def test_checkpoint_loads_and_samples(tiny_run):
    run_dir, result, _ = tiny_run
    assert [s for s, _ in resumable_checkpoints(run_dir)] == [10, 20, 30]
    model = load_model(run_dir)  # the run dir's newest checkpoint, EMA weights
    _, info = load_checkpoint(result.checkpoint)
    assert info.step == 30 and info.has_ema and info.noise == {"type": "gaussian", "std": 0.1}
    assert info.data["num_classes"] == 10 and info.data["class_names"][3] == "3" and info.data["source"] == "digits"
    assert info.config.width == 32 and info.training["batch_size"] == 16
    res = generate(model, 4, generator=torch.Generator().manual_seed(0), labels=torch.tensor([0, 1, 2, 3]))
    assert res.images.shape == (4, 1, 8, 8) and torch.isfinite(res.images).all()
    state = torch.load(result.checkpoint / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 30 and state["data"]["epoch"] >= 0 and "optimizer" in state


def test_a_run_config_with_the_former_setting_names_loads_and_resumes(tiny_run, tmp_path):
    """Run directories written before the architecture settings took ModelConfig's names (their
    config.json says `channels`, `image_size`, `blocks`) still load and resume."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    doc = json.loads((run / "config.json").read_text())
    former = {"in_channels": "channels", "img_size": "image_size", "num_blocks": "blocks"}
    doc["train"] = {former.get(k, k): v for k, v in doc["train"].items()}
    assert {"channels", "image_size", "blocks"} <= set(doc["train"]) and "num_blocks" not in doc["train"]
    (run / "config.json").write_text(json.dumps(doc, indent=2))
    cfg = load_run_config(run)
    assert cfg == tiny_cfg(tiny_run[0], max_steps=30, ema=0.9) and cfg.num_blocks == 2
    assert TrainConfig.from_dict({"blocks": 3, "image_size": 8, "channels": 1}) == TrainConfig(
        num_blocks=3, img_size=8, in_channels=1
    )
    result = train(cfg.replace(run_dir=str(run), max_steps=32), resume=True)
    assert result.status == "finished" and result.step == 32
    assert "num_blocks" in json.loads((run / "config.json").read_text())["train"]


def test_existing_run_dir_is_refused(tiny_run):
    run_dir, _, _ = tiny_run
    with pytest.raises(SetupError, match="already holds a run"):
        train(tiny_cfg(run_dir))


def test_run_dir_holding_a_checkpoint_or_run_config_is_left_alone(tiny_run, tmp_path):
    """`--run-dir` pointed at a checkpoint (or a run whose events are gone) must not overwrite
    its config.json: the checkpoint would no longer load."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run[1].checkpoint, ckpt)
    before = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    with pytest.raises(SetupError, match="is a checkpoint directory"):
        train(tiny_cfg(ckpt, max_steps=2))
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before
    load_model(ckpt)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_run[0] / "config.json").read_text())
    with pytest.raises(SetupError, match="already holds a run"):
        train(tiny_cfg(bare, max_steps=2))


def test_unwritable_run_dir_and_bad_data(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SetupError, match="cannot write to run directory"):
        train(tiny_cfg(blocker / "run"))
    with pytest.raises(SetupError, match="nope"):
        train(tiny_cfg(tmp_path / "r2", data=str(tmp_path / "nope")))
    assert not (tmp_path / "r2").exists()  # nothing created for a run that never started
    with pytest.raises(SetupError, match="needs --data"):
        train(tiny_cfg(tmp_path / "r3", data=None))


def test_full_disk_before_start(tmp_path, monkeypatch):
    import shutil as _sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("tarflow_core.train.run_dir.shutil.disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(TrainError, match="disk space") as info:
        train(tiny_cfg(tmp_path / "run"))
    assert info.value.exit_code == 1
    assert _sh is not None


# --------------------------------------------------------------------------- exact resume


def assert_resume_is_exact(tmp_path, stop_at: int, **kw):
    """Run `tiny_cfg(**kw)` straight (in tmp_path/a), and stopped after `stop_at` steps then resumed (in
    tmp_path/b): the final weights, and the EMA's when kept, are bit-identical. (straight, part, rest)."""
    straight = train(tiny_cfg(tmp_path / "a", **kw))
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= stop_at

    part = train(tiny_cfg(tmp_path / "b", **kw), stop=stop)
    assert part.status == "interrupted" and part.step == stop_at and part.exit_code == 130
    rest = train(load_run_config(tmp_path / "b"), resume=True)
    assert rest.status == "finished" and rest.step == straight.step
    assert_same_weights(weights(straight.checkpoint), weights(rest.checkpoint))
    if kw.get("ema"):
        ema = "ema.safetensors"
        assert_same_weights(weights(straight.checkpoint, ema), weights(rest.checkpoint, ema))
    return straight, part, rest


def test_resume_in_process_is_exact(tmp_path):
    """VP prior, EMA, label drop, uniform noise: stop at 9, resume to 20 == straight 20."""
    kw = dict(max_steps=20, nvp=False, ema=0.9, noise="uniform", checkpoint_every=0, sample_every=0, eval_every=0)
    _, _, rest = assert_resume_is_exact(tmp_path, 9, **kw)
    assert rest.step == 20
    ev = list(read_events(tmp_path / "b" / "events.jsonl"))
    first_end = next(i for i, e in enumerate(ev) if e["kind"] == "end")
    logged = [e["step"] for e in ev[:first_end] if e["kind"] == "train"]
    assert logged == [5, 9]  # the partial interval is logged when the run stops
    assert [e["status"] for e in ev if e["kind"] == "end"] == ["interrupted", "finished"]
    assert [e.get("resumed_from") is not None for e in ev if e["kind"] == "start"] == [False, True]


@pytest.mark.parametrize(
    "name, damage",
    [
        ("train_state.pt", lambda f: f.write_bytes(b"")),  # EOFError
        ("train_state.pt", lambda f: f.write_bytes(f.read_bytes()[:2000])),  # truncated zip
        ("train_state.pt", lambda f: torch.save({"a": torch.zeros(1)}, f)),  # some other tensors file
        ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:100])),  # SafetensorError
        ("ema.safetensors", lambda f: f.write_bytes(b"x" * 64)),
    ],
)
def test_damaged_latest_checkpoint_is_one_clear_sentence(tiny_run, tmp_path, name, damage):
    """A damaged file in the newest checkpoint: a SetupError naming it and the way back to the
    previous intact checkpoint (never a traceback from the unpickler or safetensors)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    damage(run / "checkpoints" / "step-00000030" / name)
    with pytest.raises(SetupError) as info:
        train(load_run_config(run).replace(run_dir=str(run)), resume=True)
    msg = str(info.value)
    assert name in msg and "step-00000030" in msg and "step 20" in msg and "\n" not in msg, msg
    shutil.rmtree(run / "checkpoints" / "step-00000030")  # as the message says: resume from step 20
    result = train(load_run_config(run).replace(run_dir=str(run), max_steps=21), resume=True)
    assert result.status == "finished" and result.step == 21


def test_resume_when_the_data_changed_says_so(tmp_path):
    """A folder that gained images since the run stopped: the message is about the data, not a
    damaged checkpoint."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(data / f"{i:02d}.png")
    cfg = tiny_cfg(tmp_path / "run", data=str(data), batch_size=8, max_steps=2, eval_every=0, sample_every=0)
    assert train(cfg).status == "finished"
    for i in range(40, 48):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(data / f"{i:02d}.png")
    with pytest.raises(SetupError, match="now has") as info:
        train(cfg.replace(max_steps=4), resume=True)
    assert "damaged" not in str(info.value) and str(data) in str(info.value)


def test_resuming_a_finished_run_keeps_its_checkpoint_and_tells_a_new_schedule(tiny_run, tmp_path):
    """Resuming at the end rewrites nothing (the newest checkpoint is the state); extending the run
    recomputes the learning-rate schedule, which is told in a warning."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    cfg = load_run_config(run).replace(run_dir=str(run))
    last = run / "checkpoints" / "step-00000030"
    before = {f.name: f.stat().st_ino for f in last.iterdir()}
    again = train(cfg, resume=True)
    assert again.status == "finished" and again.checkpoint == last
    assert {f.name: f.stat().st_ino for f in last.iterdir()} == before
    end = list(read_events(run / "events.jsonl"))[-1]
    assert end["kind"] == "end" and end["checkpoint"] == str(last)
    seen = []
    longer = train(cfg.replace(max_steps=32), resume=True, emit=seen.append)
    assert longer.status == "finished" and longer.step == 32
    notes = [e for e in seen if e["kind"] == "warning" and e.get("reason") == "schedule"]
    assert len(notes) == 1 and "from 30 to 32 steps" in notes[0]["message"]


def test_leftovers_of_a_killed_save_are_cleared_by_the_next_save(tiny_run, tmp_path):
    """SIGKILL mid-save leaves a temporary folder (or a step folder without train_state.pt, or a
    half-removed old one); resume uses the intact checkpoint and the next save clears them."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    ck = run / "checkpoints"
    shutil.copytree(ck / "step-00000030", ck / ".step-00000040.k1ll3d.tmp")  # a save that never finished
    shutil.copytree(ck / "step-00000010", ck / "step-00000005")  # half-removed: no train state
    (ck / "step-00000005" / "train_state.pt").unlink()
    shutil.copytree(ck / "step-00000030", ck / "step-00000031")  # killed before its train state
    (ck / "step-00000031" / "train_state.pt").unlink()
    result = train(
        load_run_config(run).replace(run_dir=str(run), max_steps=32, checkpoint_every=1, keep_checkpoints=2),
        resume=True,
    )
    assert result.status == "finished" and result.step == 32
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000031", "step-00000032"]
    assert [s for s, _ in resumable_checkpoints(run)] == [31, 32]


def test_a_run_directory_in_use_is_refused(tiny_run, tmp_path):
    """`--resume` of a run that is still going (another process holds it) would interleave two
    runs' checkpoints and events: refused while held, fine once released."""
    import fcntl
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    cfg = load_run_config(run).replace(run_dir=str(run), max_steps=31)
    before = (run / "events.jsonl").read_bytes()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242")
        held.flush()
        with pytest.raises(SetupError, match=r"in use by another tarflow train \(process 4242\)"):
            train(cfg, resume=True)
    assert (run / "events.jsonl").read_bytes() == before
    assert train(cfg, resume=True).status == "finished"


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(SetupError, match="no complete checkpoint"):
        train(tiny_cfg(tmp_path / "none"), resume=True)


def _wait_for_step(events: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        if events.exists() and any(e["kind"] == "train" and e["step"] >= step for e in read_events(events)):
            return
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


ARGS = (
    "--width 32 --head-dim 16 --blocks 2 --layers-per-block 1 --batch-size 16 --log-every 2 "
    "--eval-every 0 --sample-every 0 --checkpoint-every 0 --device cpu --ui plain --ema 0.9"
).split()


def test_sigint_then_resume_matches_straight_run(tmp_path):
    """A real SIGINT to `python -m tarflow_cli train`: exit 130 with a checkpoint; --resume finishes
    with exactly the weights of an uninterrupted run."""
    steps = 200
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tarflow_cli", "train", *ARGS, "--max-steps", str(steps)]
    proc = subprocess.Popen(
        [*cmd, "--run-dir", str(tmp_path / "b")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step(tmp_path / "b" / "events.jsonl", 6, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out.strip() == str(tmp_path / "b")
    end = [e for e in read_events(tmp_path / "b" / "events.jsonl") if e["kind"] == "end"][-1]
    assert end["status"] == "interrupted" and 6 <= end["step"] < steps
    resumed = subprocess.run(
        [sys.executable, "-m", "tarflow_cli", "train", "--resume", str(tmp_path / "b"), "--ui", "plain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    cfg = load_run_config(tmp_path / "b").replace(run_dir=str(tmp_path / "a"))
    straight = train(cfg)  # the same settings, uninterrupted, in this process
    assert straight.status == "finished"
    a = straight.checkpoint
    b = tmp_path / "b" / "checkpoints" / f"step-{steps:08d}"
    assert_same_weights(weights(a), weights(b))
    assert_same_weights(weights(a, "ema.safetensors"), weights(b, "ema.safetensors"))


# ---------------------------------------------------------------------------- failures


def test_repeated_nonfinite_steps_fail_keeping_last_good_checkpoint(tmp_path):
    def hook(step, x, y):
        return (x + float("inf"), y) if step >= 12 else (x, y)

    seen = []
    result = train(
        tiny_cfg(tmp_path / "run", max_steps=40, checkpoint_every=5, eval_every=0, sample_every=0),
        emit=seen.append,
        batch_hook=hook,
    )
    assert result.status == "failed" and result.exit_code == 1 and result.step == 17
    assert "5 consecutive" in result.reason
    end = seen[-1]
    assert end["kind"] == "end" and end["status"] == "failed" and "non-finite" in end["reason"]
    assert len([e for e in seen if e["kind"] == "warning"]) == 5
    # no checkpoint inside the run of skipped steps (step 15): the ones before it are kept
    steps = [s for s, _ in resumable_checkpoints(tmp_path / "run")]
    assert steps == [5, 10]
    model = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # checkpoints every step, newest 3 kept: the streak does not push the good ones out
    train(
        tiny_cfg(
            tmp_path / "every", max_steps=40, checkpoint_every=1, keep_checkpoints=3, eval_every=0, sample_every=0
        ),
        batch_hook=hook,
    )
    assert [s for s, _ in resumable_checkpoints(tmp_path / "every")] == [10, 11, 12]


def test_divergence_right_after_a_checkpoint_points_past_it(tmp_path):
    """Weights that turn every later step non-finite (e.g. --lr far too high): the checkpoint
    saved just before the streak holds them, so the message names the one before it, and a
    resume from there with a lower --lr runs on (the change told in a warning)."""

    def hook(step, x, y):
        return (x + float("inf"), y) if step >= 10 else (x, y)

    cfg = tiny_cfg(tmp_path / "run", max_steps=40, checkpoint_every=5, eval_every=0, sample_every=0)
    result = train(cfg, batch_hook=hook)
    assert result.status == "failed" and result.step == 15
    assert "newest checkpoint (step 10) holds the weights" in result.reason
    assert f"remove {tmp_path / 'run' / 'checkpoints' / 'step-00000010'} to resume from step 5" in result.reason
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000010")
    seen = []
    again = train(cfg.replace(max_steps=8, lr=1e-3), resume=True, emit=seen.append)
    assert again.status == "finished" and again.step == 8
    assert any(e["kind"] == "warning" and "--lr 0.003 -> 0.001" in e["message"] for e in seen)


def test_data_that_vanishes_mid_run_fails_cleanly_and_keeps_the_progress(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from tarflow_core.data.folder import FolderDataset

    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    decode, reads = FolderDataset._decode, {"n": 0}

    def vanishing(self, path):  # after 7 batches of 8, every file is gone
        reads["n"] += 1
        if reads["n"] > 56:
            raise FileNotFoundError(path)
        return decode(self, path)

    monkeypatch.setattr(FolderDataset, "_decode", vanishing)
    with pytest.warns(RuntimeWarning):
        result = train(
            tiny_cfg(
                tmp_path / "run",
                data=str(tmp_path),
                batch_size=8,
                max_steps=50,
                eval_every=0,
                sample_every=0,
                checkpoint_every=0,
            )
        )
    assert result.status == "failed" and result.exit_code == 1 and result.step == 7
    assert "could not be read" in result.reason and "has the data moved" in result.reason
    assert "weights at step 7 were saved" in result.reason
    assert [s for s, _ in resumable_checkpoints(tmp_path / "run")] == [7]
    end = list(read_events(tmp_path / "run" / "events.jsonl"))[-1]
    assert end["kind"] == "end" and end["status"] == "failed" and end["checkpoint"]


def test_fused_optimizer_skips_on_device(tmp_path, monkeypatch):
    """The CUDA path (fused AdamW gated by found_inf, checks at log intervals), forced on the CPU:
    non-finite steps leave weights, EMA and the VP prior untouched, and repeated ones end the run."""
    monkeypatch.setenv("TARFLOW_FUSED_ADAMW", "1")
    kw = dict(eval_every=0, sample_every=0, checkpoint_every=0, nvp=False, ema=0.9)
    nan = lambda step, x, y: (x * float("nan"), y)  # noqa: E731
    skipped = train(tiny_cfg(tmp_path / "skip", max_steps=4, log_every=2, max_bad_steps=100, **kw), batch_hook=nan)
    assert skipped.status == "finished"
    torch.manual_seed(0)
    fresh = TarFlow(tiny_cfg(tmp_path, **kw).model_config(1, 8, 10)).state_dict()
    assert_same_weights(weights(skipped.checkpoint), fresh)
    assert_same_weights(weights(skipped.checkpoint, "ema.safetensors"), fresh)
    ev = [e for e in read_events(tmp_path / "skip" / "events.jsonl") if e["kind"] == "warning"]
    assert [e["step"] for e in ev] == [2, 4] and "2 step(s)" in ev[0]["message"]
    failed = train(tiny_cfg(tmp_path / "fail", max_steps=40, log_every=3, max_bad_steps=3, **kw), batch_hook=nan)
    assert failed.status == "failed" and failed.step == 3


def test_stop_finishes_the_step_then_checkpoints(tmp_path):
    result = train(tiny_cfg(tmp_path / "run", max_steps=5), stop=lambda: True)
    assert result.status == "interrupted" and result.step == 1
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000001"
    assert [s for s, _ in resumable_checkpoints(tmp_path / "run")] == [1]


def test_second_interrupt_after_the_save_says_the_checkpoint_was_saved(tmp_path):
    """A second Ctrl-C that lands once the stop's checkpoint is written: the `end` event must not
    claim that no checkpoint was saved."""

    def emit(e):
        if e["kind"] == "checkpoint":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "run", max_steps=5, eval_every=0, sample_every=0), emit=emit, stop=lambda: True)
    end = list(read_events(tmp_path / "run" / "events.jsonl"))[-1]
    assert end["kind"] == "end" and end["status"] == "interrupted"
    assert "no checkpoint" not in end["reason"] and "saved" in end["reason"]
    assert [s for s, _ in resumable_checkpoints(tmp_path / "run")] == [1]


def test_default_run_dir_is_fresh(tmp_path):
    from tarflow_core.train import default_run_dir

    first = default_run_dir(preset("tiny"), root=str(tmp_path))
    assert first.parent == tmp_path and first.name.startswith("tiny-")
    first.mkdir()
    second = default_run_dir(preset("tiny"), root=str(tmp_path))
    assert second != first and not second.exists()


def test_stop_on_signals_sets_event_then_raises():
    from tarflow_core.train import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):  # a second signal: abandon now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_by_sigterm_is_not_put_on_the_user(tmp_path):
    """The end event names SIGTERM (a scheduler, `kill`); Ctrl-C and the dashboard's key are the user's."""
    import threading

    from tarflow_core.train.signals import SignalStop, stop_on_signals, stop_reason

    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert stop.signal_name == "SIGTERM" and stop_reason(stop) == "stopped by SIGTERM"
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert stop_reason(stop) == "stopped by the user"
    assert stop_reason(threading.Event()) == stop_reason(lambda: True) == stop_reason(None) == "stopped by the user"
    stop = SignalStop()
    stop.signal_name = "SIGTERM"
    stop.set()
    kw = dict(max_steps=4, checkpoint_every=0, sample_every=0, eval_every=0)
    assert train(tiny_cfg(tmp_path / "run", **kw), stop=stop).status == "interrupted"
    end = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["kind"] == "end"]
    assert [e["reason"] for e in end] == ["stopped by SIGTERM"]


def test_stop_on_signals_under_torchrun_takes_the_launchers_echo_for_the_same_request(monkeypatch):
    """Ctrl-C on `torchrun` reaches a worker from the terminal and again forwarded by the launcher:
    that echo must not abort the step (no checkpoint would be saved); a later signal still does."""
    from tarflow_core.train import stop_on_signals

    monkeypatch.setenv("WORLD_SIZE", "2")
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's copy
        time.sleep(0.02)
        assert stop.is_set()
        time.sleep(1.0)
        with pytest.raises(KeyboardInterrupt):  # the user insists
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


def test_image_that_fails_to_decode_mid_run_is_replaced_and_reported(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from tarflow_core.data.folder import FolderDataset

    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    decode = FolderDataset._decode

    def flaky(self, path):
        if path.name == "03.png":
            raise OSError("image file is truncated")
        return decode(self, path)

    monkeypatch.setattr(FolderDataset, "_decode", flaky)
    with pytest.warns(RuntimeWarning, match="03.png: cannot decode image"):
        result = train(
            tiny_cfg(
                tmp_path / "run",
                data=str(tmp_path),
                batch_size=8,
                max_steps=6,
                log_every=3,
                eval_every=0,
                sample_every=0,
                checkpoint_every=0,
            )
        )
    assert result.status == "finished"
    warned = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e.get("reason") == "unreadable"]
    assert warned and "failed to decode" in warned[0]["message"]


def test_model_config_clash_names_the_options(tmp_path):
    with pytest.raises(
        SetupError, match=r"image size 8 \(--image-size\) is not a multiple of patch size 3 \(--patch-size\)"
    ):
        train(tiny_cfg(tmp_path / "run", patch_size=3))
