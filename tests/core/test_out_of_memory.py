"""Never lose a run to a side job: at a due step the checkpoint is written before previews; running out
of memory in a preview or an evaluation is a warning and the run goes on; in a training step it ends the
run with one sentence, the last checkpoint intact. Out-of-memory errors are faked (allocator failures)."""

from __future__ import annotations

import pytest
import torch

import tarflow_core.likelihood
from tarflow_core.events import read_events
from tarflow_core.train import TrainError, train
from tarflow_core.train.outcome import classify_failure
from tarflow_core.train.previews import Previews
from tarflow_core.train.step import Stepper

from .test_train import assert_same_weights, tiny_cfg, weights

KW = dict(max_steps=6, checkpoint_every=4, eval_every=4, sample_every=4, log_every=2)


def fake_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")


def test_out_of_memory_is_classified_in_one_place():
    def how(e):
        return classify_failure(e, started=True, distributed=False)

    assert how(torch.OutOfMemoryError("x")) == "oom"
    assert how(RuntimeError("CUDA error: out of memory")) == "oom"
    assert how(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")) == "oom"
    assert how(MemoryError()) == "oom"
    assert how(RuntimeError("shape mismatch")) == "crash" and how(TrainError("x")) == "failed"


def test_out_of_memory_in_previews_is_a_warning_and_the_checkpoint_is_already_saved(tmp_path, monkeypatch):
    straight = train(tiny_cfg(tmp_path / "a", **KW))
    seen = []

    def sample(self, model, ema, run_dir, step, autocast):
        seen.append((step, sorted(p.name for p in (run_dir / "checkpoints").iterdir())))
        fake_oom()

    monkeypatch.setattr(Previews, "sample", sample)
    monkeypatch.setattr(tarflow_core.likelihood, "bpd_figures", fake_oom)  # inside the evaluation's loop
    result = train(tiny_cfg(tmp_path / "b", **KW))
    assert result.status == "finished" and result.step == 6
    assert seen == [(4, ["step-00000004"]), (6, ["step-00000004", "step-00000006"])]  # saved before the preview
    events = list(read_events(tmp_path / "b" / "events.jsonl"))
    oom = [(e["step"], e["message"]) for e in events if e["kind"] == "warning" and e.get("reason") == "oom"]
    assert oom == [
        (s, f"out of memory in the {what} at step {s}: skipped, the run goes on")
        for s in (4, 6)
        for what in ("evaluation", "sample grid")
    ]
    assert not [e for e in events if e["kind"] in ("eval", "sample")]
    assert_same_weights(weights(straight.checkpoint), weights(result.checkpoint))  # the training went on as ever


def test_out_of_memory_in_a_training_step_ends_the_run_in_one_sentence(tmp_path, monkeypatch):
    step = Stepper.__call__

    def failing(self, i, x, y):
        if i == 5:
            fake_oom()
        return step(self, i, x, y)

    monkeypatch.setattr(Stepper, "__call__", failing)
    result = train(tiny_cfg(tmp_path / "run", micro_batch=8, **KW))
    saved = tmp_path / "run" / "checkpoints"
    assert result.status == "failed" and result.step == 5 and result.exit_code == 1
    assert result.checkpoint == saved / "step-00000004" and sorted(p.name for p in saved.iterdir()) == ["step-00000004"]
    reason = result.reason
    assert reason.startswith("out of memory in training step 6 (measured peak ")
    assert "on cpu" in reason and "plan" in reason
    assert "lower --micro-batch (now 8) or use --checkpointing blocks" in reason
    assert reason.endswith("the last checkpoint (step-00000004) is intact")
    assert "\n" not in reason and reason.count(". ") == 0
    end = list(read_events(tmp_path / "run" / "events.jsonl"))[-1]
    assert (end["kind"], end["status"], end["reason"]) == ("end", "failed", reason)
    monkeypatch.setattr(Stepper, "__call__", step)
    train(tiny_cfg(tmp_path / "straight", micro_batch=8, **KW))
    same_step = tmp_path / "straight" / "checkpoints" / "step-00000004"
    assert_same_weights(weights(same_step), weights(result.checkpoint))  # intact


@pytest.mark.parametrize("mode", ["blocks", "layers"])
def test_the_remedy_does_not_suggest_what_is_already_on(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(Stepper, "__call__", lambda self, i, x, y: fake_oom())
    result = train(tiny_cfg(tmp_path / "run", checkpointing=mode, **KW))
    assert result.status == "failed" and result.step == 0
    assert "lower --micro-batch (now 16); no checkpoint was saved" in result.reason
