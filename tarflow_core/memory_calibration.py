"""Measured peak memory on the CPU, to calibrate and test the memory plan (`memory.py`) against.

A fresh process per figure runs one training step or one denoising pass of a small model and reports
its peak; tests/core/test_memory.py and benchmarks/memory.py compare it with the plan. Linux only (it
reads /proc/self/status and resets the high-water mark through /proc/self/clear_refs).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import torch

from .config import ModelConfig

WHAT = ("training", "denoising")


def measure_peak(
    what: str,
    cfg: ModelConfig,
    batch: int,
    precision: str = "fp32",
    checkpointing: str = "off",
    ema: bool = False,
    device: str = "cpu",
) -> int:
    """Measured peak bytes of one training step (forward, loss, backward, AdamW, EMA when `ema`) or one
    denoising pass (`what`) at `batch` images, in a fresh process (see `_measure_child`); bf16 is
    autocast. `device` "cuda": the allocator's own peak (`torch.cuda.max_memory_allocated`, no context,
    no fragmentation: compare with the plan's peak less `DEVICE_OVERHEAD`), fused AdamW as the trainer."""
    if what not in WHAT:
        raise ValueError(f"what must be one of {', '.join(WHAT)} (got {what!r})")
    job = {"what": what, "cfg": cfg.to_dict(), "batch": batch, "precision": precision}
    job.update(checkpointing=checkpointing, ema=ema, device=device)
    # Freed tensors must leave the resident set, or the high-water mark is the allocator's history: glibc
    # returns memory to the system only for blocks above its mmap threshold, which it raises on its own
    # after frees unless it is set. One thread: no per-thread arenas, and two measurements can run at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = "import sys, tarflow_core.memory_calibration as m; m._measure_child(sys.argv[1])"
    cmd = [sys.executable, "-c", code, json.dumps(job)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode:
        raise RuntimeError(f"measuring {what} failed: {out.stderr.strip()[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure_child(job_text: str) -> None:
    """The measuring process: warm up at batch 1, reset the high-water mark (`clear_refs` 5), run the
    measured batch, print its peak as the high-water mark's rise plus the tensors alive before it.

    The warm-up takes the one-time costs out of the figure: the first forward alone grows the resident
    set by ~70 MB (oneDNN/MKL initialisation, library code paged in) that the plan does not model (on
    CUDA the context stands for them). What the warm-up leaves (weights, AdamW state, gradients, the EMA
    copy) is counted exactly from the tensors instead."""
    from .ema import EMA
    from .likelihood import denoise
    from .model import TarFlow
    from .train.step import objective

    job = json.loads(job_text)
    torch.manual_seed(0)
    cfg, device, cuda = ModelConfig.from_dict(job["cfg"]), torch.device(job["device"]), job["device"] == "cuda"
    model = TarFlow(cfg).to(device)
    _checkpoint(model, job["checkpointing"])
    training = job["what"] == "training"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None) if training else None
    ema = EMA(model, 0.999) if training and job["ema"] else None

    def run(b: int) -> None:
        x = torch.randn(b, cfg.in_channels, cfg.img_size, cfg.img_size, device=device) * 0.5
        y = torch.zeros(b, dtype=torch.long, device=device) if cfg.num_classes else None
        if optimizer is None:
            denoise(model, x, y, sigma=0.1)
            return
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["precision"] == "bf16"):
            z, logdet = model(x, y)
        loss = objective(z.float(), logdet, cfg.data_dim)
        optimizer.zero_grad(set_to_none=True)  # after the forward, as in train/step.py
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)

    run(1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run(job["batch"])
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated())
        return
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [t for st in (optimizer.state.values() if optimizer else ()) for t in st.values()]
    tensors += list(ema.shadow.values()) if ema else []
    alive = sum(t.numel() * t.element_size() for t in tensors if t.dim())  # AdamW's step counts are 0-d
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    run(job["batch"])
    print((_status_kib("VmHWM") - before) * 1024 + alive)


def _checkpoint(model, mode: str) -> None:
    """Activation checkpointing for the measurement: the model's own (`TarFlow.set_checkpointing`), else
    each block's or each layer's forward wrapped in torch.utils.checkpoint (non-reentrant), the same."""
    from torch.utils.checkpoint import checkpoint

    if mode == "off":
        return
    if hasattr(model, "set_checkpointing"):  # the model's own, where it has it
        model.set_checkpointing(mode)
        return
    modules = model.blocks if mode == "blocks" else [layer for b in model.blocks for layer in b.attn_blocks]
    for module in modules:
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
