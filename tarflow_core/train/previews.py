"""What a run shows while it trains: sample grids from fixed noise and labels, and the held-out
bits per dimension. Both use the EMA weights when the run keeps them."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path
from ..config import ModelConfig, TrainConfig
from ..dist import DistInfo, all_reduce_sum, any_flag
from ..ema import EMA
from ..model import TarFlow
from .outcome import classify_failure
from .run_dir import SAMPLES_DIR

SAMPLE_SEED_OFFSET = 1_000_003
EVAL_SEED = 20250101


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> dict[str, int]:
    """Model-space NCHW images -> one PNG grid (atomic), upscaled so small images stay visible.
    Returns the layout: `nrow` (images per row), `tile` (pixels per image side), `padding`."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = x.shape
    scale = max(1, 32 // max(h, w))
    if scale > 1:
        x = x.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    ncol = nrow or math.ceil(math.sqrt(n))
    rows, pad = math.ceil(n / ncol), 2
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[:, :, 0] if c == 1 else grid, "L" if c == 1 else "RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return {"nrow": ncol, "tile": h, "padding": pad}


class Previews:
    """Sample grids (rank 0) and held-out evaluation (all ranks, each scoring its share)."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, d: DistInfo, test_ds, eval_batch: int) -> None:
        self.cfg, self.model_cfg, self.d, self.test_ds, self.eval_batch = cfg, model_cfg, d, test_ds, eval_batch
        self._ema_model: TarFlow | None = None
        # every grid of the run starts from the same noise and labels, so grids compare across steps
        g = torch.Generator().manual_seed(cfg.seed + SAMPLE_SEED_OFFSET)
        mc = model_cfg
        self.noise = torch.randn(cfg.num_samples, mc.num_patches, mc.token_dim, generator=g)
        self.labels = (torch.arange(cfg.num_samples) % mc.num_classes) if mc.conditional else None

    def weights(self, model: TarFlow, ema: EMA | None) -> tuple[TarFlow, str]:
        """The model previews use: the EMA weights (in a model kept for them) or the trained ones."""
        if ema is None:
            return model, "model"
        if self._ema_model is None:
            self._ema_model = TarFlow(self.model_cfg).to(self.d.device)
        ema.copy_to(self._ema_model)
        return self._ema_model, "ema"

    @torch.no_grad()
    def evaluate(self, model: TarFlow, ema: EMA | None) -> dict | None:
        """Held-out bpd from a fixed seed, over a fixed subset, all ranks: uniform dequantization, or
        for a model with a learned q(u | x) the variational bound and, beside it from the same draws,
        the uniform figure (`bpd_uniform`). The `eval` event's fields, or None without a held-out split."""
        if self.test_ds is None:
            return None
        from ..likelihood import bpd_figures

        model, which = self.weights(model, ema)
        ds, d, device = self.test_ds, self.d, self.d.device
        n = len(ds) if self.cfg.eval_images is None else min(len(ds), self.cfg.eval_images)
        idx = list(range(d.rank, n, d.world_size))
        gen = torch.Generator(device=device).manual_seed(EVAL_SEED + d.rank)
        dequants = ("uniform",) if model.dequantizer is None else ("variational", "uniform")
        total = torch.zeros(len(dequants) + 1, dtype=torch.float64, device=device)  # the bpd sums, the count
        bs, failed = self.eval_batch, None
        was_training = model.training
        model.eval()
        try:
            for s in range(0, len(idx), bs):
                items = [ds[i] for i in idx[s : s + bs]]
                x = torch.stack([it[0] for it in items]).to(device)
                y = torch.tensor([it[1] for it in items], device=device) if self.model_cfg.conditional else None
                figures = bpd_figures(model, x, y, dequants=dequants, generator=gen)
                sums = [torch.nan_to_num(b.double(), nan=float("inf")).sum() for b in figures]
                total += torch.stack([*sums, torch.tensor(float(len(items)), dtype=torch.float64, device=device)])
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
            if classify_failure(e, started=True, distributed=d.distributed) != "oom":
                raise
            failed = e  # told to the other processes first, so that none waits in the sum below
        finally:
            model.train(was_training)
        if any_flag(failed is not None, d):
            raise failed or torch.OutOfMemoryError("out of memory in another process's evaluation")
        all_reduce_sum(total, d)
        *sums, count = total.tolist()
        means = [s / count if count else float("nan") for s in sums]
        fields = {"bpd": means[0], "images": int(count), "split": "test", "weights": which}
        if len(means) > 1:  # the bound first; old runs' events have neither of these
            fields.update(bpd_uniform=means[1], dequant="variational")
        return fields

    @torch.no_grad()
    def sample(self, model: TarFlow, ema: EMA | None, run_dir: Path, step: int, autocast: torch.dtype | None) -> dict:
        """A grid of `num_samples` samples (denoised by one score step for Gaussian-noise runs)
        saved under `samples/`; the `sample` event's fields."""
        from ..sampling import generate

        model, which = self.weights(model, ema)
        cfg, device = self.cfg, self.d.device
        sigma = cfg.noise_std if cfg.noise == "gaussian" else None
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            res = generate(
                model,
                cfg.num_samples,
                generator=torch.Generator().manual_seed(cfg.seed + 1),
                batch_size=min(cfg.num_samples, 256),
                labels=self.labels,
                noise=self.noise,
                denoise_sigma=sigma,
                cuda_graphs=False,
            )  # previews are short and run beside DDP's threads: no capture
        k = self.model_cfg.num_classes
        nrow = k if k and cfg.num_samples % k == 0 and k <= 32 else None
        path = run_dir / SAMPLES_DIR / f"step-{step:08d}.png"
        layout = save_grid(res.images, path, nrow=nrow)
        return dict(
            path=str(path),
            num=cfg.num_samples,
            **layout,
            weights=which,
            denoised=sigma is not None,
            redrawn=res.redrawn,
        )
