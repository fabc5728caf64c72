"""TarFlow weights trained for a few hundred steps on the embedded digits, cached on disk.

Random weights leave every block close to an identity plus a small perturbation, so Jacobi
iteration converges in a few passes; trained blocks are far from that, so the sampling
benchmark times both. The training is deliberately simple and fixed (see TRAIN):

  * data: the digits train split (1,500 8x8 grayscale images, 10 classes) resized bilinearly
    to the model's image size (torch `interpolate`, rounded back to uint8) and repeated to its
    channels, mapped to [-1, 1] by `tarflow_core.flow.uint8_to_model`;
  * each step: a batch of 32 drawn uniformly with replacement, Gaussian noise (std 0.05) added,
    10% of the labels dropped to -1 (the mean class embedding, the unconditional branch that
    guidance uses);
  * loss: the trainer's `tarflow_core.train.objective` (0.5 mean z^2 - mean log-det / D);
  * AdamW (lr 1e-3, weight decay 1e-4), the trainer's schedule `lr_at`: linear warm-up over the
    first 10% of the steps, cosine decay to 1e-5; no gradient clipping;
  * reported: training bits per dimension, the trainer's figure (loss + log(2 pi) / 2 nats,
    on the noisy inputs), mean over the last 10% of the steps; and the training time.

The result is saved with `tarflow_core.checkpoint.save_checkpoint` under the cache folder, in a
directory named after the configuration, the steps, the seed and a hash of all of it, so a rerun
loads it instead of training again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tarflow_core import flow
from tarflow_core.checkpoint import load_checkpoint, save_checkpoint
from tarflow_core.config import ModelConfig
from tarflow_core.data import open_digits
from tarflow_core.model import TarFlow
from tarflow_core.train import lr_at, objective

TRAIN = {
    "data": "digits train split, bilinear resize",
    "batch": 32,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "weight_decay": 1e-4,
    "warmup_fraction": 0.1,
    "noise_std": 0.05,
    "label_drop": 0.1,
}


def digits_tensors(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits train split at the model's shape: uint8 (N, C, S, S) and int64 labels (N,)."""
    ds = open_digits("train")
    images = torch.from_numpy(ds.images[ds.indices]).float()  # (N, 1, 8, 8), 0..255
    labels = torch.from_numpy(ds.labels[ds.indices].astype("int64"))
    images = F.interpolate(images, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).repeat(1, cfg.in_channels, 1, 1)
    return images, labels


def cache_path(cache_dir: Path, cfg: ModelConfig, steps: int, seed: int) -> Path:
    key = json.dumps({"model": cfg.to_dict(), "steps": steps, "seed": seed, "train": TRAIN}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_dir / (
        f"digits-{cfg.in_channels}x{cfg.img_size}-{cfg.short_name()}-c{cfg.num_classes}"
        f"-{steps}steps-seed{seed}-{digest}"
    )


def trained_model(
    cfg: ModelConfig,
    steps: int,
    seed: int,
    cache_dir: Path,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    log=print,
) -> tuple[TarFlow, dict]:
    """Our TarFlow trained `steps` steps on the digits (loaded from the cache when there) and a
    summary of its training: final bits per dimension, seconds, whether it came from the cache."""
    path = cache_path(cache_dir, cfg, steps, seed)
    if path.is_dir():
        model, info = load_checkpoint(path, device)
        summary = {**info.training, "cached": True, "path": str(path)}
        log(
            f"trained weights loaded from {path} (trained {summary['steps']} steps in "
            f"{summary['train_seconds']:.0f} s, final training bpd {summary['final_bpd']:.3f})"
        )
        return model.eval(), summary
    log(f"training {cfg.short_name()} on the digits for {steps} steps (cached as {path}) ...")
    model, summary = train_on_digits(cfg, steps, seed, device, autocast_dtype, log)
    save_checkpoint(path, model, noise={"type": "gaussian", "std": TRAIN["noise_std"]}, step=steps, training=summary)
    log(f"trained in {summary['train_seconds']:.0f} s, final training bpd {summary['final_bpd']:.3f}")
    return model.eval(), {**summary, "cached": False, "path": str(path)}


def train_on_digits(
    cfg: ModelConfig, steps: int, seed: int, device: torch.device, autocast_dtype: torch.dtype | None = None, log=print
) -> tuple[TarFlow, dict]:
    """The training loop described in the module docstring."""
    images, labels = digits_tensors(cfg)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TarFlow(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    warmup = max(1, round(TRAIN["warmup_fraction"] * steps))
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    bpds = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images), (TRAIN["batch"],), generator=gen)
        x = flow.uint8_to_model(images[idx]) + TRAIN["noise_std"] * torch.randn(
            (TRAIN["batch"], *images.shape[1:]), generator=gen
        )
        y = labels[idx]
        if cfg.conditional:
            y = torch.where(torch.rand(len(y), generator=gen) < TRAIN["label_drop"], torch.full_like(y, -1), y)
        else:
            y = None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=TRAIN["lr"], min_lr=TRAIN["min_lr"], warmup_steps=warmup, total_steps=steps)
        with autocast:
            z, logdet = model(x.to(device), y.to(device) if y is not None else None)
        loss = objective(z, logdet, cfg.data_dim)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at step {step} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bpds.append(flow.nats_to_bpd(loss.detach() + 0.5 * flow.LOG_2PI).item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1}/{steps}: training bpd {bpds[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    tail = bpds[-max(1, steps // 10) :]
    return model.eval(), {
        "steps": steps,
        "seed": seed,
        "train_seconds": seconds,
        "final_bpd": sum(tail) / len(tail),
        "first_bpd": bpds[0] if bpds else None,
        "settings": TRAIN,
    }
