"""Canned run directories for the dashboard tests: events.jsonl + PNG sample grids, fixed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from tarflow_cli.io import make_grid

T0 = 1_760_000_000.0  # a fixed start time (unix seconds)
DIGITS = Path(__file__).resolve().parents[2] / "tarflow_core" / "data" / "digits.npz"


def digit_grid(n: int = 16, nrow: int = 4, offset: int = 0, padding: int = 2) -> np.ndarray:
    """A make_grid HWC uint8 grid of `n` 8x8 digits (gray as RGB), black padding."""
    imgs = np.load(DIGITS)["images"][offset : offset + n]  # (n, 1, 8, 8)
    return make_grid(np.repeat(imgs, 3, axis=1), nrow=nrow, padding=padding)


def write_grid(path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(digit_grid(**kw)).save(path)
    return path


def start_event(step: int = 0, max_steps: int = 1000, t: float = T0) -> dict:
    return {
        "time": t,
        "kind": "start",
        "step": step,
        "config": {
            "preset": "tiny",
            "data": "digits",
            "max_steps": max_steps,
            "batch_size": 64,
            "image_size": None,
            "device": "cpu",
        },
        "params": 52_340,
        "device": "cpu",
        "data": {"name": "digits", "train": 1617, "test": 180, "shape": [1, 8, 8], "classes": 10},
    }


def train_event(step: int, t: float | None = None) -> dict:
    bpd = 3.0 + 2.5 * math.exp(-step / 150) + 0.05 * math.sin(step / 7)
    return {
        "time": T0 + step * 0.05 if t is None else t,
        "kind": "train",
        "step": step,
        "loss": bpd * math.log(2) - math.log(128),
        "nll": bpd * math.log(2) - math.log(128),
        "bpd": bpd,
        "logdet": -1.5 + step / 1000,
        "lr": 2e-3 * min(1.0, step / 100 + 0.01),
        "grad_norm": 1.2,
        "images_per_s": 1250.0 + 40 * math.sin(step / 50),
        "memory": 512 * 2**20,
        "epoch": step * 64 / 1617,
    }


def make_run(
    root: Path,
    *,
    steps: int = 600,
    max_steps: int = 1000,
    finished: bool = False,
    samples: bool = True,
    extra: list[str] | None = None,
    name: str = "tiny-demo",
) -> Path:
    """A run directory at `root/name` with `steps` of events (every 10 steps), evals every 100,
    sample grids every 200, a warning, and an `end` event when `finished`."""
    run = root / name
    (run / "samples").mkdir(parents=True, exist_ok=True)
    lines = [start_event(max_steps=max_steps)]
    for step in range(10, steps + 1, 10):
        lines.append(train_event(step))
        if step % 100 == 0:
            lines.append(
                {"time": T0 + step * 0.05, "kind": "eval", "step": step, "bpd": 3.2 + 2.4 * math.exp(-step / 160)}
            )
        if step % 200 == 0 and samples:
            p = write_grid(run / "samples" / f"step{step:06d}.png", offset=step // 200 * 16)
            lines.append({"time": T0 + step * 0.05, "kind": "sample", "step": step, "path": str(p.relative_to(run))})
        if step == 300:
            lines.append(
                {
                    "time": T0 + step * 0.05,
                    "kind": "warning",
                    "step": step,
                    "message": "non-finite loss at step 300: step skipped (1 of 5 allowed)",
                }
            )
    if finished:
        lines.append(
            {
                "time": T0 + steps * 0.05,
                "kind": "checkpoint",
                "step": steps,
                "path": str(run / "checkpoints" / f"step{steps:06d}"),
            }
        )
        lines.append(
            {
                "time": T0 + steps * 0.05 + 0.5,
                "kind": "end",
                "step": steps,
                "status": "finished",
                "reason": f"reached --max-steps {steps}",
            }
        )
    text = "".join(json.dumps(e) + "\n" for e in lines)
    text += "".join(x + "\n" for x in (extra or []))
    (run / "events.jsonl").write_text(text)
    return run


def append(run: Path, *events: dict | str, newline: bool = True) -> None:
    with open(run / "events.jsonl", "a") as f:
        for e in events:
            f.write((e if isinstance(e, str) else json.dumps(e)) + ("\n" if newline else ""))
