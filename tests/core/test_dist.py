"""Distributed training on CPU (gloo): two processes match one at the same global batch, and
only rank 0 writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tarflow_core.config import TrainConfig
from tarflow_core.dist import DistError, distributed, env_world
from tarflow_core.events import read_events

ROOT = Path(__file__).resolve().parents[2]


def cfg_for(run_dir, **kw) -> TrainConfig:
    base = dict(
        width=32,
        head_dim=16,
        num_blocks=2,
        layers_per_block=1,
        batch_size=16,
        max_steps=8,
        log_every=4,
        eval_every=8,
        sample_every=8,
        checkpoint_every=4,
        num_samples=10,
        eval_images=20,
        lr=3e-3,
        nvp=False,
        ema=0.9,
        run_dir=str(run_dir),
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import tarflow_core.train as T

    if rank != 0:  # any write from another rank fails the run

        def refuse(*a, **k):
            raise AssertionError(f"rank {rank} tried to write")

        T.checkpoints.save_checkpoint = refuse
        T.run_dir.atomic_write_text = refuse
        T.state.atomic_path = refuse
        T.previews.save_grid = refuse
        T.report.JsonlSink = refuse
    result = T.train(TrainConfig.from_dict(cfg_dict))
    torch.save({"status": result.status, "step": result.step}, Path(out) / f"rank{rank}.pt")


def test_env_world_and_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == (0, 1, 0)
    with distributed("cpu") as d:
        assert (d.rank, d.world_size, d.distributed, d.is_main, d.device.type) == (0, 1, False, True, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(DistError, match="RANK"):
        env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistError, match="not an integer"):
        env_world()


def test_two_gloo_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    from tarflow_core.train import train

    single = train(cfg_for(tmp_path / "one"))
    assert single.status == "finished"
    cfg = cfg_for(tmp_path / "two")
    mp.start_processes(
        _worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    for r in (0, 1):
        assert torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["status"] == "finished"
    a = load_file(str(single.checkpoint / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # VP prior (all-reduced z^2), label drop and noise shares: same global batch
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ea = load_file(str(single.checkpoint / "ema.safetensors"))
    eb = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000008" / "ema.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-5, msg=k)
    ev1 = list(read_events(tmp_path / "one" / "events.jsonl"))
    ev2 = list(read_events(tmp_path / "two" / "events.jsonl"))
    assert [e["kind"] for e in ev1] == [e["kind"] for e in ev2]  # one writer: no duplicated events
    start = ev2[0]
    assert start["world_size"] == 2 and start["global_batch"] == 16
    t1 = [e["loss"] for e in ev1 if e["kind"] == "train"]
    t2 = [e["loss"] for e in ev2 if e["kind"] == "train"]  # averaged across ranks
    assert t1 == pytest.approx(t2, rel=1e-4, abs=1e-5)
    b1 = [e["bpd"] for e in ev1 if e["kind"] == "eval"]
    b2 = [e["bpd"] for e in ev2 if e["kind"] == "eval"]
    assert b1 == pytest.approx(b2, abs=0.05)  # different dequantization draws per rank


@pytest.mark.parametrize("noise", ["gaussian", "variational"])
def test_two_gloo_processes_accumulating_match_one_without(tmp_path, noise):
    """Each rank's 8 images in two micro-batches of 4 (DDP all-reduces in the last backward only) ==
    one process stepping on all 16 at once. Variational: q runs inside the forward DDP wraps, its
    gradients all-reduced with the flow's."""
    torch.set_num_threads(1)
    from tarflow_core.train import train

    single = train(cfg_for(tmp_path / "one", max_steps=4, sample_every=0, eval_every=0, noise=noise))
    cfg = cfg_for(tmp_path / "two", max_steps=4, sample_every=0, eval_every=0, micro_batch=4, noise=noise)
    mp.start_processes(
        _worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    for r in (0, 1):
        assert torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["status"] == "finished"
    a = load_file(str(single.checkpoint / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("dequantizer.") for k in a) == (noise == "variational")
    for k in a:  # VP prior from the whole global batch's z^2, the same noise and label-drop shares
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    start = next(iter(read_events(tmp_path / "two" / "events.jsonl")))
    assert (start["world_size"], start["micro_batch"], start["accumulation"]) == (2, 4, 2)


def test_batch_must_split_across_ranks(tmp_path):
    from tarflow_core.dist import DistInfo
    from tarflow_core.train import SetupError, Trainer

    trainer = Trainer(
        cfg_for(tmp_path / "odd", batch_size=15),
        DistInfo(0, 2, 0, torch.device("cpu"), "gloo"),
        None,
        None,
        False,
        None,
    )
    with pytest.raises(SetupError, match="multiple of the number of processes"):
        trainer.setup()
    assert not (tmp_path / "odd").exists()


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
def test_torchrun_cli_two_processes(tmp_path):
    """The documented launch form: torchrun ... -m tarflow_cli train ..."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node=2",
        "--master_port",
        str(free_port()),
        "-m",
        "tarflow_cli",
        "train",
        "--width",
        "32",
        "--head-dim",
        "16",
        "--blocks",
        "2",
        "--layers-per-block",
        "1",
        "--batch-size",
        "16",
        "--max-steps",
        "4",
        "--log-every",
        "2",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--device",
        "cpu",
        "--ui",
        "plain",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(tmp_path / "run")]  # rank 0 only
    ev = list(read_events(tmp_path / "run" / "events.jsonl"))
    assert ev[0]["world_size"] == 2 and ev[-1]["status"] == "finished"
    # continued by one process: it works, and says the weights will not match a 2-process run
    import dataclasses

    from tarflow_core.train import load_run_config, train

    cfg = dataclasses.replace(load_run_config(tmp_path / "run"), max_steps=6)
    assert train(cfg, resume=True).status == "finished"
    ev = list(read_events(tmp_path / "run" / "events.jsonl"))
    notes = [e for e in ev if e["kind"] == "warning" and e.get("reason") == "world_size"]
    assert notes and "resumed with 1 process(es) where the run used 2" in notes[0]["message"]


def _dying_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import tarflow_core.train as T

    def hook(step, x, y):
        if rank == 1 and step == 5:
            os._exit(9)  # a crash: no clean-up, the connection just drops
        return x, y

    result = T.train(TrainConfig.from_dict(cfg_dict), batch_hook=hook)
    torch.save({"status": result.status, "step": result.step, "reason": result.reason}, Path(out) / f"rank{rank}.pt")


def test_a_rank_that_dies_ends_the_run_cleanly_on_rank_0(tmp_path):
    """Rank 1 dies mid-run: rank 0 does not hang or raise a gloo traceback; it ends the run
    "failed" with a reason that says what happened, and the last checkpoint stays."""
    cfg = cfg_for(tmp_path / "run", max_steps=40, log_every=1, checkpoint_every=4, eval_every=0, sample_every=0)
    ctx = mp.start_processes(
        _dying_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    ctx.processes[0].join(timeout=120)
    alive = ctx.processes[0].is_alive()
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert not alive, "rank 0 hung after rank 1 died"
    assert ctx.processes[0].exitcode == 0
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert result["status"] == "failed" and "another process of the distributed run failed" in result["reason"]
    end = list(read_events(tmp_path / "run" / "events.jsonl"))[-1]
    assert end["kind"] == "end" and end["status"] == "failed" and end["reason"] == result["reason"]
    assert "step-00000004" in end["reason"]
    from tarflow_core.train import resumable_checkpoints

    assert [s for s, _ in resumable_checkpoints(tmp_path / "run")] == [4]
