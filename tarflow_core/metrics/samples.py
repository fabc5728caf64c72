"""Samples for FID, drawn in fixed-size shards with per-shard seeds, optionally cached on disk.

Shard i holds samples i*S .. min(N, (i+1)*S) - 1 and is drawn by
:func:`tarflow_core.sampling.generate` from its own generator, seeded from (seed, i). So a
shard's images depend only on the checkpoint, the sampling settings, the seed, the shard size
and i -- not on how many shards were drawn before, nor on whether a cache is used. A cache
folder holds ``manifest.json`` (the settings) and ``shard-000000.npz`` ... (uint8 NHWC images
under ``arr_0`` plus ``labels``, the layout standard FID tools read). An interrupted 50k-sample
run restarted with the same folder reuses every complete shard and continues where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, atomic_write_text
from ..sampling import generate

SHARD_SIZE = 1000
MANIFEST = "manifest.json"
CACHE_FORMAT = "tarflow-sample-cache"
_SHARD_STREAM = 0x5A3B1E


class SampleCacheError(ValueError):
    """A sample cache folder that does not belong to this run's settings, or is unusable."""


def shard_seed(seed: int, index: int) -> int:
    """A 63-bit seed for shard ``index`` derived from the run's seed (SeedSequence mixing)."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index), _SHARD_STREAM]).generate_state(
        2, np.uint32
    )
    return (int(words[0]) << 31) ^ int(words[1])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space floats in [-1, 1] -> uint8 by round-half-up of (clip(x) + 1) * 127.5,
    the rule ``tarflow sample`` writes images with."""
    v = (x.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5  # float32, as the CLI's writer
    return torch.floor(v + 0.5).clamp(0, 255).to(torch.uint8)


@dataclass
class Shard:
    index: int
    images: torch.Tensor  # uint8 (n, C, H, W)
    labels: torch.Tensor | None
    cached: bool  # read from the cache rather than drawn now
    redrawn: int = 0


def shard_bounds(num: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(num, s + shard_size)) for s in range(0, num, shard_size)]


class SampleCache:
    """A folder of sample shards tied to one set of settings (checked on open)."""

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists, etc.)
        if self.folder.exists() and not self.folder.is_dir():
            raise SampleCacheError(f"--sample-cache {self.folder}: exists and is not a folder")
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise SampleCacheError(f"--sample-cache {self.folder}: unreadable {MANIFEST} ({e})") from None
            if stored.get("format") != CACHE_FORMAT:
                raise SampleCacheError(f"--sample-cache {self.folder}: {MANIFEST} is not a tarflow sample cache")
            old = stored.get("settings", {})
            if old != self.settings:
                keys = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                raise SampleCacheError(
                    f"--sample-cache {self.folder} holds samples drawn with different settings "
                    f"({', '.join(keys)}); use another folder or delete this one"
                )
        else:
            if self.folder.exists() and any(self.folder.glob("shard-*.npz")):
                raise SampleCacheError(
                    f"--sample-cache {self.folder}: has shards but no {MANIFEST}; use another folder or delete this one"
                )
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                manifest, json.dumps({"format": CACHE_FORMAT, "version": 1, "settings": self.settings}, indent=2) + "\n"
            )

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.npz"

    def read(self, index: int, count: int) -> Shard | None:
        """Shard ``index`` if it is complete with ``count`` images; None when absent or damaged."""
        p = self.path(index)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                images = z["arr_0"]
                labels = z["labels"] if "labels" in z.files else None
                redrawn = int(z["redrawn"]) if "redrawn" in z.files else 0
        except Exception:
            return None  # a damaged shard is drawn again
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != count:
            return None
        nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return Shard(index, nchw, torch.from_numpy(labels).long() if labels is not None else None, True, redrawn)

    def write(self, shard: Shard) -> None:
        arrays = {"arr_0": shard.images.permute(0, 2, 3, 1).contiguous().numpy(), "redrawn": np.asarray(shard.redrawn)}
        if shard.labels is not None:
            arrays["labels"] = shard.labels.numpy().astype(np.int64)
        with atomic_path(self.path(shard.index)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)


def sample_shards(
    model,
    num: int,
    *,
    seed: int,
    batch_size: int = 64,
    shard_size: int = SHARD_SIZE,
    cache: SampleCache | None = None,
    denoise_sigma: float | None = None,
    denoise_lr_scale: float = 1.0,
    max_batch: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    **options,
) -> Iterator[Shard]:
    """Yield ``num`` samples as uint8 shards, reading complete shards from ``cache`` and
    drawing (and caching) the rest. ``options``: those of :func:`~tarflow_core.sampling.generate`
    (guidance, guide_what, attn_temp, annealed, sampler, segments, tol). A measured sampler
    (``auto`` / ``gs-jacobi`` without segments) is calibrated on the first shard drawn and keeps
    that choice for the rest of the run. ``max_batch`` bounds the denoising step's passes (see
    ``generate``); it changes no image, so the cache does not key it."""
    options = dict(options)
    done = 0
    for index, (start, stop) in enumerate(shard_bounds(num, shard_size)):
        shard = cache.read(index, stop - start) if cache is not None else None
        if shard is None:
            g = torch.Generator().manual_seed(shard_seed(seed, index))
            base = done

            def advance(d: int, _t: int, base=base) -> None:
                if on_progress is not None:
                    on_progress(base + d, num)

            result = generate(
                model,
                stop - start,
                generator=g,
                batch_size=batch_size,
                denoise_sigma=denoise_sigma,
                denoise_lr_scale=denoise_lr_scale,
                max_batch=max_batch,
                on_batch=advance,
                **options,
            )
            shard = Shard(index, to_uint8(result.images), result.labels, False, result.redrawn)
            if options.get("sampler") in ("auto", "gs-jacobi") and options.get("segments") is None:
                options["segments"] = result.settings.get("segments")
            if cache is not None:
                cache.write(shard)
        done = stop
        if on_progress is not None:
            on_progress(done, num)
        yield shard
