"""`--threads`: the same command and seed give the same numbers whatever the machine's load; the
count is recorded with the run and reused by `--resume`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tarflow_core.events import read_events
from tarflow_core.train import load_run_config, train

from ..core.test_train import _wait_for_step
from .test_train_cli import SMALL, assert_user_error, run

ROOT = Path(__file__).resolve().parents[2]
BUSY = 1e4  # a load average above any machine's core count


@pytest.fixture
def load(monkeypatch):
    """`load(x)`: the 1-minute load average the process reads from now on."""

    def set_load(value: float) -> None:
        monkeypatch.setattr(os, "getloadavg", lambda: (value, value, value))

    return set_load


@pytest.fixture
def own_threads(monkeypatch):
    """torch's own count as a command starts with on an idle 2-core machine (the tests otherwise run
    with OMP_NUM_THREADS=1); the test's count again afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def weights(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_does_not_depend_on_the_load_average(tmp_path, load, own_threads):
    """Started on an idle and on a busy machine: identical weights; the busy run says once that
    --threads 1 may be faster."""
    told = {}
    for name, value in (("idle", 0.0), ("busy", BUSY)):
        load(value)
        r = run(*SMALL, "--max-steps", "6", "--run-dir", tmp_path / name, "--ui", "plain")
        assert r.exit_code == 0, r.stderr
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["environment"]["threads"] == own_threads
        told[name] = [line for line in r.stderr.splitlines() if "--threads 1 may be much faster" in line]
    assert_same(weights(tmp_path / "idle", 6), weights(tmp_path / "busy", 6))
    assert len(told["busy"]) == 1 and not told["idle"]
    busy = [e for e in read_events(tmp_path / "busy" / "events.jsonl") if e["kind"] == "warning"]
    assert [e["reason"] for e in busy] == ["busy"] and "--threads 1 may be much faster" in busy[0]["message"]
    assert not [e for e in read_events(tmp_path / "idle" / "events.jsonl") if e["kind"] == "warning"]


def test_threads_is_recorded_and_reused_by_resume(tmp_path, own_threads, load):
    load(0.0)
    r = run(*SMALL, "--max-steps", "2", "--threads", "1", "--run-dir", tmp_path / "run", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["threads"] == 1 and config["environment"]["threads"] == 1
    r = run("--resume", tmp_path / "run", "--max-steps", "4", "--ui", "plain")  # the process has 2
    assert r.exit_code == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert len(warned) == 1 and "run length changed" in warned[0], r.stderr  # nothing about threads
    assert torch.get_num_threads() == own_threads
    starts = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["kind"] == "start"]
    assert [e["environment"]["threads"] for e in starts] == [1, 1]
    r = run("--resume", tmp_path / "run", "--max-steps", "6", "--threads", "2", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert len(warned) == 2, r.stderr  # the new run length, and the thread count
    assert "resumed with --threads 2 where the run used 1" in warned[1] and "exactly" in warned[1]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["threads"] == 2


def test_bad_thread_count_is_a_usage_error(tmp_path):
    assert_user_error(run(*SMALL, "--threads", "0", "--run-dir", tmp_path / "run"), "--threads", "(got 0)")
    assert not (tmp_path / "run").exists()


# `tarflow train ...` in a process that reads the load average given as its first argument
UNDER_LOAD = """
import os, sys
load = float(sys.argv[1])
os.getloadavg = lambda: (load, load, load)
sys.argv = ["tarflow", *sys.argv[2:]]
from tarflow_cli import entry
entry.main()
"""


def test_sigint_then_resume_under_another_load_matches_straight_run(tmp_path):
    """A real SIGINT to a run started on an idle machine, resumed on a busy one, with torch's own
    thread count (no OMP_NUM_THREADS): the weights of an uninterrupted run."""
    steps, run_dir = 120, tmp_path / "b"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(ROOT)}
    args = [*SMALL, "--checkpoint-every", "0", "--ui", "plain"]
    first = subprocess.Popen(
        [sys.executable, "-c", UNDER_LOAD, "0", "train", *args, "--max-steps", str(steps), "--run-dir", run_dir],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step(run_dir / "events.jsonl", 6, first)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    resumed = subprocess.run(
        [sys.executable, "-c", UNDER_LOAD, str(BUSY), "train", "--resume", str(run_dir), "--ui", "plain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    starts = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "start"]
    counts = {e["environment"]["threads"] for e in starts}
    assert len(starts) == 2 and len(counts) == 1
    if counts != {1}:  # several threads on a busy machine: told, not changed
        assert "--threads 1 may be much faster" in resumed.stderr
    cfg = load_run_config(run_dir).replace(run_dir=str(tmp_path / "a"), threads=counts.pop())
    assert train(cfg).status == "finished"
    assert_same(weights(tmp_path / "a", steps), weights(run_dir, steps))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tarflow_core.checkpoint import save_checkpoint
    from tests.conftest import tiny_model

    path = tmp_path_factory.mktemp("ck") / "model"
    save_checkpoint(path, tiny_model(seed=3, dtype=torch.float32), noise={"type": "uniform", "std": None}, step=1)
    return path


def sample_npz(ckpt: Path, out: Path, *extra) -> tuple[object, dict, str]:
    import numpy as np
    from typer.testing import CliRunner

    from tarflow_cli.io import NPZ_META_KEY
    from tarflow_cli.main import app

    args = ["sample", "-c", str(ckpt), "-n", "8", "--seed", "5", "--out", str(out), *map(str, extra)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    with np.load(out) as z:
        return z["arr_0"], json.loads(str(z[NPZ_META_KEY])), r.stderr


def test_sample_does_not_depend_on_the_load_average(ckpt, tmp_path, load, own_threads):
    load(0.0)
    idle, idle_meta, idle_err = sample_npz(ckpt, tmp_path / "idle.npz")
    load(BUSY)
    busy, busy_meta, busy_err = sample_npz(ckpt, tmp_path / "busy.npz")
    assert (idle == busy).all()
    assert idle_meta["threads"] == busy_meta["threads"] == own_threads == torch.get_num_threads()
    told = [line for line in busy_err.splitlines() if "--threads 1 may be much faster" in line]
    assert len(told) == 1 and told[0].startswith("note: ") and "--threads 1" not in idle_err
    _, meta, err = sample_npz(ckpt, tmp_path / "one.npz", "--threads", "1")  # busy, but one thread: nothing to say
    assert meta["threads"] == 1 and "--threads 1" not in err


def test_eval_records_its_threads(ckpt, load):
    from typer.testing import CliRunner

    from tarflow_cli.main import app

    load(0.0)
    r = CliRunner().invoke(app, ["eval", "-c", str(ckpt), "--data", "digits", "--threads", "1", "-b", "64"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["threads"] == 1
    r = CliRunner().invoke(app, ["score", "-c", str(ckpt), "x.npy", "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.stderr
