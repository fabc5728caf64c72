"""FID for `tarflow eval`: its options, and the Inception statistics of the data and of samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer

from tarflow_core.metrics import SampleCache, image_stats, sample_shards, save_stats
from tarflow_core.metrics.common import ordered_batches
from tarflow_core.metrics.inception import INPUT_SIZE

from ..console import UsageError, info
from ..options import OptionGroup, SamplingOptions
from .numbers import POSITIVE
from .progress import progress_bar

RANDOM_WEIGHTS_WARNING = (
    "FID computed with randomly initialised Inception weights: a plumbing check only, "
    "not comparable to any published FID"
)


@dataclasses.dataclass(frozen=True)
class FidOptions(OptionGroup):
    """The Inception and caching options of `tarflow eval` (FID also reads --num-samples and the
    sampling options)."""

    fid_stats: Annotated[
        Optional[Path],
        typer.Option(
            "--fid-stats",
            help="Reference statistics .npz (mu, sigma): read if it exists, else computed from --data/--split "
            "and written there \\[default: a cache file keyed by data, split and image size].",
            show_default=False,
        ),
    ] = None
    inception_weights: Annotated[
        Optional[str],
        typer.Option(
            "--inception-weights",
            help="The FID Inception weight file the FID tools distribute ('random': a plumbing check only) "
            "\\[default: $TARFLOW_INCEPTION, the cache, or a download].",
            show_default=False,
        ),
    ] = None
    inception_resize: Annotated[
        str,
        typer.Option(
            "--inception-resize",
            help="Resize to 299: tf (TensorFlow 1.x bilinear, as the TF FID graph) or pytorch (as pytorch-fid).",
        ),
    ] = "tf"
    inception_size: Annotated[
        int, typer.Option("--inception-size", hidden=True, help="Inception input size (299; smaller only for tests).")
    ] = INPUT_SIZE
    fid_batch_size: Annotated[
        int, typer.Option("--fid-batch-size", parser=POSITIVE, help="Images per Inception batch.")
    ] = 50
    sample_cache: Annotated[
        Optional[Path],
        typer.Option(
            "--sample-cache",
            help="Folder of sample shards: an interrupted FID run restarted with it continues where it stopped.",
            show_default=False,
        ),
    ] = None


@dataclasses.dataclass
class FidSetup:
    """What FID needs, made before any long work so that a bad cache, missing weights or a bad
    statistics file fail at once."""

    sampler: dict[str, Any]  # the sampler settings as `sample_shards` takes them (and the cache keys them)
    denoise_sigma: float | None
    cache: SampleCache | None = None
    inception: Any = None
    network: str = ""  # the Inception weights, resize and size, as statistics files record them
    stats_path: Path | None = None
    reference: Any = None  # the data's statistics, when read from an existing file


def stats_meta(path: Path) -> tuple[str | None, int | None]:
    """The Inception weights/preprocessing and image count a stats file records (ours do;
    other tools' files have only mu and sigma)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            network = str(z["inception"]) if "inception" in z.files else None
            count = int(z["num_images"]) if "num_images" in z.files else None
            return network, count
    except Exception:
        return None, None


def reference_stats(inception, dataset, fid_batch_size: int, path: Path, network: str, max_batch: int | None = None):
    """The data's Inception statistics, computed and written to `path` for the next run (the network's
    passes at most `max_batch` images)."""
    info(f"computing FID reference statistics of {dataset.description} -> {path}")
    with progress_bar("reference stats", len(dataset)) as advance:
        stats = image_stats(
            inception,
            (images for images, _ in ordered_batches(dataset, fid_batch_size)),
            total=len(dataset),
            on_batch=lambda d, t: advance(d),
            max_batch=max_batch,
        )
    if stats.n < 2:
        raise UsageError(
            f"--data {dataset.name} ({dataset.split}): FID reference statistics need at least 2 images, found {stats.n}"
        )
    mu, sigma = stats.result()
    try:
        save_stats(path, mu, sigma, num_images=stats.n, source=f"{dataset.name}:{dataset.split}", inception=network)
    except OSError as e:
        info(f"warning: could not write FID reference statistics to {path} ({e})")
    return stats


def sample_stats(
    model,
    setup: FidSetup,
    sampling: SamplingOptions,
    num: int,
    *,
    seed: int,
    batch_size: int,
    fid_batch_size: int,
    max_batch: int | None = None,
) -> tuple[Any, int, int]:
    """The Inception statistics of `num` samples, with how many were redrawn (non-finite values)
    and how many came from the sample cache; the denoising step's and the network's passes hold at
    most `max_batch` images."""
    redrawn = reused = 0
    with progress_bar("sampling", num) as advance:

        def chunks() -> Iterator[torch.Tensor]:
            nonlocal redrawn, reused
            for shard in sample_shards(
                model,
                num,
                seed=seed,
                batch_size=batch_size,
                cache=setup.cache,
                denoise_sigma=setup.denoise_sigma,
                denoise_lr_scale=sampling.denoise_lr_scale,
                max_batch=max_batch,
                on_progress=lambda d, t: advance(d),
                cuda_graphs=sampling.cuda_graphs,
                **setup.sampler,
            ):
                redrawn += shard.redrawn
                reused += len(shard.images) if shard.cached else 0
                for i in range(0, len(shard.images), fid_batch_size):
                    yield shard.images[i : i + fid_batch_size]

        stats = image_stats(setup.inception, chunks(), max_batch=max_batch)
    return stats, redrawn, reused
