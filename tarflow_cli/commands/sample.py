"""`tarflow sample`: draw images from a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from tarflow_core import __version__
from tarflow_core.load_errors import describe, file_head, not_numpy
from tarflow_core.runtime import tf32_in_use
from tarflow_core.sampling import generate

from ..console import UsageError, info, user_errors
from ..io import InputError, check_output, write_output
from ..options import (
    FLAG,
    BatchOpt,
    CkptOpt,
    ClassOpt,
    DeviceOpt,
    LabelsOpt,
    MaxBatchOpt,
    PatchOpt,
    SamplingOptions,
    SeedOpt,
    ThreadsOpt,
    out_option,
    with_option_groups,
)
from .common import announce_output, count, key_values, load, per_image, resolve_device, resolve_labels
from .numbers import POSITIVE
from .progress import progress_bar
from .sampling_setup import check_precision_options, check_sampling_options, parse_segments, sampling_denoise_sigma

NumOpt = Annotated[
    Optional[int],
    typer.Option(
        "--num",
        "-n",
        parser=POSITIVE,
        help="Number of images \\[default: 64, or the rows of --noise, or one per --labels entry].",
        show_default=False,
    ),
]
NoiseOpt = Annotated[
    Optional[Path],
    typer.Option("--noise", help="Exact prior noise: a .npy of shape (N, T, D).", show_default=False),
]
OutOpt = out_option(
    "X.png grid, folder/ of PNGs, X.npz (uint8 NHWC arr_0), X.npy (float32 NCHW), or - (npy on stdout)."
)
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", metavar=FLAG, help="Print the settings used.")]


@with_option_groups
def sample(
    ckpt: CkptOpt,
    num: NumOpt = None,
    batch_size: BatchOpt = 64,
    max_batch: MaxBatchOpt = None,
    class_: ClassOpt = None,
    labels: LabelsOpt = None,
    sampling: SamplingOptions = SamplingOptions(),
    noise: NoiseOpt = None,
    seed: SeedOpt = 0,
    out: OutOpt = "samples.png",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    patch_size: PatchOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Draw images from a checkpoint.

    --out takes a PNG grid, a folder/ of PNGs, .npz, .npy or - (stdout); -v prints the settings.

    Examples:

      tarflow sample --ckpt runs/tiny -n 64 --out grid.png

      tarflow sample --ckpt afhq_model_8_768_8_8_0.07.pth --class 1 \\
        --guidance 2 --out cats/

      tarflow sample --ckpt runs/tiny --out - | tarflow score --ckpt runs/tiny -
    """
    with user_errors():
        check_sampling_options(sampling)
        check_output(out)
        dev = resolve_device(device, threads)
        check_precision_options(sampling, dev)
        model, ck = load(ckpt, dev, patch_size)
        cfg = model.config
        segments = parse_segments(sampling.segments, len(model.blocks), cfg.num_patches, sampling.sampler)
        prior_noise = _read_noise(noise, cfg) if noise is not None else None
        n, y = _count_and_labels(ck, num, prior_noise, noise, class_=class_, labels=labels)
        sigma = sampling_denoise_sigma(ck, sampling)
        if verbose:
            info(
                f"checkpoint {ck.path}: {cfg.short_name()} {'NVP' if cfg.nvp else 'VP'}, "
                f"{cfg.in_channels}x{cfg.img_size}x{cfg.img_size}, {cfg.num_classes} classes; device {dev}, "
                f"{torch.get_num_threads()} threads, tf32 {'on' if tf32_in_use(dev) else 'off'}; seed {seed}; "
                f"{key_values(sampling.guidance_settings())}; denoise sigma {sigma}"
                + (f", max batch {max_batch}" if max_batch is not None else "")
            )
        start = time.perf_counter()
        with progress_bar("sampling", n) as advance:
            result = generate(
                model,
                n,
                generator=torch.Generator().manual_seed(seed),
                batch_size=batch_size,
                labels=y,
                noise=prior_noise,
                denoise_sigma=sigma,
                denoise_lr_scale=sampling.denoise_lr_scale,
                max_batch=max_batch,
                on_batch=lambda done, total: advance(done),
                sampler=sampling.sampler,
                segments=segments,
                tol=sampling.tol,
                check_every=sampling.check_every,
                precision=sampling.precision,
                cuda_graphs=sampling.cuda_graphs,
                **sampling.guidance_settings(),
            )
        seconds = time.perf_counter() - start
        if verbose:
            info(f"sampler: {key_values(result.settings)}")
        meta = _metadata(ck, seed, n, sampling, result, sigma, noise, max_batch=max_batch, tf32=tf32_in_use(dev))
        written = write_output(result.images, out, labels=result.labels, metadata=meta)
        redrawn = f", {result.redrawn} redrawn after non-finite values" if result.redrawn else ""
        took = f"{seconds:.2f} s ({per_image(seconds / n)}/image{redrawn})"
        announce_output(f"sampled {count(n, 'image')} in {took}", written, out)


def _count_and_labels(
    ck, num: int | None, prior_noise: torch.Tensor | None, noise: Path | None, *, class_, labels
) -> tuple[int, torch.Tensor | None]:
    """How many images to draw (--num, else the rows of --noise, else one per --labels entry, else
    64) and their labels."""
    if prior_noise is not None and num is not None and num != len(prior_noise):
        raise UsageError(f"--num {num} does not match --noise {noise}, which holds {len(prior_noise)} rows")
    n = len(prior_noise) if prior_noise is not None else num
    if n is None and labels is not None:  # one image per label
        y = resolve_labels(ck, None, class_=class_, labels_path=labels)
        return (len(y) if y is not None else 64), y
    n = n or 64
    return n, resolve_labels(ck, n, class_=class_, labels_path=labels)


def _metadata(
    ck, seed: int, n: int, sampling: SamplingOptions, result, sigma, noise: Path | None, *, max_batch, tf32: bool
) -> dict:
    """What the output records about how it was made."""
    return {
        "tarflow_version": __version__,
        "checkpoint": str(ck.path),
        "seed": seed,
        "num": n,
        "threads": torch.get_num_threads(),  # the results depend on it
        "tf32": tf32,  # TF32 products change them too
        "max_batch": max_batch,
        **sampling.guidance_settings(),
        "sampling": result.settings,
        "denoise_sigma": sigma,
        "denoise_lr_scale": sampling.denoise_lr_scale if sigma else None,
        "noise_file": str(noise) if noise else None,
        "redrawn": result.redrawn,
    }


def _read_noise(path: Path, cfg) -> torch.Tensor:
    problem = not_numpy(file_head(path))
    if problem:
        raise InputError(f"--noise {path}: {problem}")
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"--noise {path} does not exist") from None
    except Exception as e:
        raise InputError(f"--noise {path} is not a readable .npy array ({describe(e)})") from None
    want = (cfg.num_patches, cfg.token_dim)
    if arr.ndim != 3 or tuple(arr.shape[1:]) != want or len(arr) == 0:
        raise InputError(f"--noise {path} has shape {tuple(arr.shape)}; this model needs (N, {want[0]}, {want[1]})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"--noise {path} holds {arr.dtype} values; expected floating-point noise")
    if not np.isfinite(arr).all():
        rows = int((~np.isfinite(arr.reshape(len(arr), -1))).any(axis=1).sum())
        raise InputError(f"--noise {path}: {rows} of {len(arr)} rows hold nan or inf; expected finite values")
    return torch.from_numpy(arr.astype(np.float32))
