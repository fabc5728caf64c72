"""`tarflow sample`: draw images from a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from tarflow_core import __version__
from tarflow_core.sampling import DEFAULT_TOL, GUIDE_WHAT, SAMPLERS, generate

from ..console import UsageError, info, user_errors
from ..io import InputError, write_output
from .common import (BatchOpt, CkptOpt, ClassOpt, DeviceOpt, LabelsOpt, PatchOpt, SeedOpt, load,
                     resolve_device, resolve_labels)
from .progress import progress_bar


def sample(
    ckpt: CkptOpt,
    num: Annotated[Optional[int], typer.Option("--num", "-n", min=1, help="Number of images [default: 64, or the rows of --noise].", show_default=False)] = None,
    batch_size: BatchOpt = 64,
    class_: ClassOpt = None,
    labels: LabelsOpt = None,
    guidance: Annotated[float, typer.Option("--guidance", "-g", min=0.0, help="Classifier-free guidance weight w (0: none).")] = 0.0,
    guide_what: Annotated[str, typer.Option("--guide-what", help="Guide the log-scale a, the shift b, or both: a, b, ab.")] = "ab",
    attn_temp: Annotated[float, typer.Option("--attn-temp", help="Attention temperature of the unconditional guidance pass.")] = 1.0,
    annealed: Annotated[bool, typer.Option("--annealed/--no-annealed", help="Ramp the guidance weight up along the sequence.")] = False,
    denoise: Annotated[Optional[bool], typer.Option("--denoise/--no-denoise", help="One score-based denoising step [default: on when the checkpoint was trained with Gaussian noise].", show_default=False)] = None,
    denoise_sigma: Annotated[Optional[float], typer.Option("--denoise-sigma", help="Noise std for denoising [default: the checkpoint's].", show_default=False)] = None,
    denoise_lr_scale: Annotated[float, typer.Option("--denoise-lr-scale", help="Multiplier on the denoising step.")] = 1.0,
    sampler: Annotated[str, typer.Option("--sampler", help="Inversion method: sequential (token by token), jacobi (parallel fixed-point iteration), gs-jacobi (segments in order, Jacobi inside), or auto (on CUDA: gs-jacobi with per-block settings measured on a few samples, sequential where that is faster; elsewhere sequential, which measures fastest on CPUs).")] = "auto",
    segments: Annotated[Optional[str], typer.Option("--segments", help="gs-jacobi segment length: one number, or one per block in inversion order (comma-separated; 1 = sequential) [default: measured].", show_default=False)] = None,
    tol: Annotated[float, typer.Option("--tol", help="Jacobi samplers: stop iterating when no value changes by more than this.")] = DEFAULT_TOL,
    noise: Annotated[Optional[Path], typer.Option("--noise", help="Exact prior noise: a .npy of shape (N, T, D).", show_default=False)] = None,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", "-o", help="X.png grid, folder/ of PNGs, X.npz (uint8 NHWC arr_0), X.npy (float32 NCHW), or - (npy on stdout).")] = "samples.png",
    device: DeviceOpt = "auto",
    patch_size: PatchOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print the settings used.")] = False,
) -> None:
    """Draw images from a checkpoint.

    Examples:

      tarflow sample --ckpt runs/tiny -n 64 --out grid.png

      tarflow sample --ckpt afhq_model_8_768_8_8_0.07.pth --class 1 --guidance 2 --out cats/

      tarflow sample --ckpt runs/tiny --out - | tarflow score --ckpt runs/tiny -
    """
    with user_errors():
        if guide_what not in GUIDE_WHAT:
            raise UsageError(f"--guide-what {guide_what}: expected one of {', '.join(GUIDE_WHAT)}")
        if not attn_temp > 0:
            raise UsageError(f"--attn-temp {attn_temp}: expected a positive number")
        if sampler not in SAMPLERS:
            raise UsageError(f"--sampler {sampler}: expected one of {', '.join(SAMPLERS)}")
        if not tol >= 0:
            raise UsageError(f"--tol {tol}: expected a number >= 0")
        dev = resolve_device(device)
        model, ck = load(ckpt, dev, patch_size)
        cfg = model.config
        segs = _parse_segments(segments, len(model.blocks))
        prior_noise = _read_noise(noise, cfg) if noise is not None else None
        if prior_noise is not None and num is not None and num != len(prior_noise):
            raise UsageError(f"--num {num} does not match --noise {noise}, which holds {len(prior_noise)} rows")
        n = len(prior_noise) if prior_noise is not None else (num or 64)
        y = resolve_labels(ck, n, class_=class_, labels_path=labels)
        sigma = None
        if denoise is None:
            denoise = ck.noise_std is not None
        if denoise:
            sigma = denoise_sigma if denoise_sigma is not None else ck.noise_std
            if sigma is None:
                raise UsageError(f"--denoise: checkpoint {ck.path} does not record a Gaussian training noise std; give --denoise-sigma")
            if sigma <= 0:
                raise UsageError(f"--denoise-sigma {sigma}: expected a positive number")
        settings = dict(guidance=guidance, guide_what=guide_what, attn_temp=attn_temp, annealed=annealed)
        if verbose:
            info(f"checkpoint {ck.path}: {cfg.short_name()} {'NVP' if cfg.nvp else 'VP'}, {cfg.in_channels}x{cfg.img_size}x{cfg.img_size}, "
                 f"{cfg.num_classes} classes; device {dev}; seed {seed}; {settings}; denoise sigma {sigma}")
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        with progress_bar("sampling", n) as advance:
            result = generate(model, n, generator=generator, batch_size=batch_size, labels=y, noise=prior_noise,
                              denoise_sigma=sigma, denoise_lr_scale=denoise_lr_scale,
                              on_batch=lambda done, total: advance(done), sampler=sampler, segments=segs, tol=tol,
                              **settings)
        seconds = time.perf_counter() - start
        if verbose:
            info(f"sampler: {result.settings}")
        meta = {"tarflow_version": __version__, "checkpoint": str(ck.path), "seed": seed, "num": n, **settings,
                "sampling": result.settings,
                "denoise_sigma": sigma, "denoise_lr_scale": denoise_lr_scale if sigma else None,
                "noise_file": str(noise) if noise else None, "redrawn": result.redrawn}
        written = write_output(result.images, out, labels=result.labels, metadata=meta)
        redrawn = f", {result.redrawn} redrawn after non-finite values" if result.redrawn else ""
        info(f"sampled {n} images in {seconds:.2f} s ({seconds / n:.3f} s/image{redrawn})" + (f" -> {written}" if written else ""))
        if out != "-":
            typer.echo(out)


def _parse_segments(text: str | None, blocks: int) -> int | list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--segments {text}: expected a positive integer or {blocks} comma-separated ones") from None
    if any(v < 1 for v in values) or len(values) not in (1, blocks):
        raise UsageError(f"--segments {text}: expected a positive integer or {blocks} comma-separated ones (one per block)")
    return values[0] if len(values) == 1 else values


def _read_noise(path: Path, cfg) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"--noise {path} does not exist") from None
    except Exception as e:
        raise InputError(f"--noise {path} is not a readable .npy array ({e})") from None
    want = (cfg.num_patches, cfg.token_dim)
    if arr.ndim != 3 or tuple(arr.shape[1:]) != want or len(arr) == 0:
        raise InputError(f"--noise {path} has shape {tuple(arr.shape)}; this model needs (N, {want[0]}, {want[1]})")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise InputError(f"--noise {path}: expected finite floating-point values")
    return torch.from_numpy(arr.astype(np.float32))
