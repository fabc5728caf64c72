"""tarflow_core.runtime and its use in training: the thread count is a setting, decided without
looking at the machine's load, recorded with the run and reused by a resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tarflow_core import runtime
from tarflow_core.dist import DistInfo
from tarflow_core.train import train
from tarflow_core.train.loop import _threads

from .test_train import tiny_cfg

BUSY = 1e4  # a load average above any machine's core count


@pytest.fixture
def load(monkeypatch):
    """`load(x)`: the 1-minute load average the process reads from now on."""

    def set_load(value: float) -> None:
        monkeypatch.setattr(os, "getloadavg", lambda: (value, value, value))

    return set_load


@pytest.fixture
def threads():
    """`threads(n)`: torch's count, as a process would start with; the test's count again afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_busy_note_tells_and_changes_nothing(load, threads):
    threads(2)
    load(0.0)
    assert runtime.busy_note(2) is None
    load(BUSY)
    note = runtime.busy_note(2)
    assert "--threads 1 may be much faster" in note and "\n" not in note
    assert runtime.busy_note(1) is None and runtime.busy_note(2, "cuda") is None
    assert torch.get_num_threads() == 2  # told, not acted on


def test_busy_note_without_a_load_average(monkeypatch):
    def no_load():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert runtime.busy_note(4) is None


def test_threads_for_sets_then_restores(threads):
    threads(1)
    with runtime.threads_for(2) as n:
        assert n == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == 1
    with runtime.threads_for(None) as n:  # None: torch's own count, untouched
        assert n == 1
    assert runtime.threads_problem(0) == "--threads must be a positive integer (got 0)"
    assert runtime.threads_problem(3) is None and runtime.threads_problem(None) is None


def test_environment_record_and_comparison():
    env = runtime.environment(torch.device("cpu"), 2, "fp32")
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu" and env["threads"] == 2
    assert env["precision"] == "fp32" and env["deterministic"] is torch.are_deterministic_algorithms_enabled()
    saved = {**env, "torch": "1.0.0", "threads": 1}
    assert runtime.environment_changes(saved, env) == [f"torch 1.0.0 -> {torch.__version__}", "threads 1 -> 2"]
    assert runtime.environment_changes(saved, env, skip=("threads",)) == [f"torch 1.0.0 -> {torch.__version__}"]
    assert runtime.environment_changes(None, env) == [] and runtime.environment_changes({"x": 1}, env) == []


def _weights(result):
    from safetensors.torch import load_file

    return load_file(str(result.checkpoint / "model.safetensors"))


def test_training_does_not_depend_on_the_load_average(tmp_path, load, threads):
    """The same settings and seed, started on an idle and on a busy machine: the same weights, the
    same recorded thread count, and the busy run says so in one warning."""
    threads(2)  # torch's own count on an idle 2-core machine
    results, events = {}, {}
    for name, value in (("idle", 0.0), ("busy", BUSY)):
        load(value)
        events[name] = []
        results[name] = train(tiny_cfg(tmp_path / name, max_steps=6, **QUICK), emit=events[name].append)
        assert results[name].status == "finished"
        assert torch.get_num_threads() == 2
    a, b = _weights(results["idle"]), _weights(results["busy"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("idle", "busy"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["environment"]["threads"] == 2
        assert [e["environment"]["threads"] for e in events[name] if e["kind"] == "start"] == [2]
    busy = [e for e in events["busy"] if e["kind"] == "warning" and e.get("reason") == "busy"]
    assert len(busy) == 1 and "--threads 1" in busy[0]["message"]
    assert not [e for e in events["idle"] if e["kind"] == "warning"]


QUICK = dict(log_every=2, eval_every=0, sample_every=0, checkpoint_every=0)


def stop_after(steps: int):
    """A `stop` for `train`: asks the run to stop after `steps` steps."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= steps

    return stop


def test_resume_computes_with_the_recorded_count(tmp_path, threads, load):
    """A run that took torch's own count (2) resumes with 2 in a process whose count is 1, without a
    warning; the process's count is left as it was."""
    threads(2)
    load(0.0)
    first = train(tiny_cfg(tmp_path / "run", max_steps=4, **QUICK), stop=stop_after(2))
    assert first.status == "interrupted"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["threads"] is None and config["environment"]["threads"] == 2
    threads(1)
    seen = []
    again = train(tiny_cfg(tmp_path / "run", max_steps=4, **QUICK), resume=True, emit=seen.append)
    assert again.status == "finished" and torch.get_num_threads() == 1
    assert [e["environment"]["threads"] for e in seen if e["kind"] == "start"] == [2]
    assert not [e for e in seen if e["kind"] == "warning"]


def test_resume_tells_a_changed_thread_count_and_environment(tmp_path, threads, load):
    threads(1)
    load(0.0)
    first = train(tiny_cfg(tmp_path / "run", max_steps=4, threads=1, **QUICK), stop=stop_after(2))
    assert first.status == "interrupted"
    saved = tmp_path / "run" / "checkpoints" / "step-00000002" / "config.json"
    doc = json.loads(saved.read_text())
    assert doc["training"]["environment"]["threads"] == 1
    doc["training"]["environment"]["torch"] = "1.0.0"
    saved.write_text(json.dumps(doc))
    seen = []
    cfg = tiny_cfg(tmp_path / "run", max_steps=4, threads=2, **QUICK)
    assert train(cfg, resume=True, emit=seen.append).status == "finished"
    warned = {e["reason"]: e["message"] for e in seen if e["kind"] == "warning"}
    assert warned == {
        "threads": "resumed with --threads 2 where the run used 1: floating-point sums are ordered differently, "
        "so the run does not continue exactly from step 2 on",
        "environment": "the environment differs from the one that saved the checkpoint at step 2 "
        f"(torch 1.0.0 -> {torch.__version__}): the run may not continue bit-exactly",
    }
    assert torch.get_num_threads() == 1


def test_torchrun_processes_keep_their_count_unless_given(tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    several, one = DistInfo(rank=0, world_size=2), DistInfo()
    assert _threads(cfg, several, resume=True) is None  # the launcher's count (OMP_NUM_THREADS=1)
    assert _threads(cfg.replace(threads=3), several, resume=True) == 3
    assert _threads(cfg, one, resume=False) is None
