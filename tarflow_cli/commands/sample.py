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
from tarflow_core.sampling import generate

from ..console import UsageError, info, to_stdout, user_errors
from ..io import InputError, check_output, write_output
from .common import (
    AnnealedOpt,
    AttnTempOpt,
    BatchOpt,
    CkptOpt,
    ClassOpt,
    DenoiseLrOpt,
    DenoiseOpt,
    DenoiseSigmaOpt,
    CheckEveryOpt,
    CudaGraphsOpt,
    DeviceOpt,
    GuidanceOpt,
    GuideWhatOpt,
    LabelsOpt,
    PatchOpt,
    PrecisionOpt,
    SamplerOpt,
    SeedOpt,
    SegmentsOpt,
    TolOpt,
    check_precision_options,
    check_sampling_options,
    load,
    parse_segments,
    resolve_device,
    resolve_labels,
)
from .common import denoise_sigma as resolve_denoise_sigma
from .progress import progress_bar


def sample(
    ckpt: CkptOpt,
    num: Annotated[
        Optional[int],
        typer.Option(
            "--num",
            "-n",
            min=1,
            help="Number of images \\[default: 64, or the rows of --noise, or one per --labels entry].",
            show_default=False,
        ),
    ] = None,
    batch_size: BatchOpt = 64,
    class_: ClassOpt = None,
    labels: LabelsOpt = None,
    guidance: GuidanceOpt = 0.0,
    guide_what: GuideWhatOpt = "ab",
    attn_temp: AttnTempOpt = 1.0,
    annealed: AnnealedOpt = False,
    denoise: DenoiseOpt = None,
    denoise_sigma: DenoiseSigmaOpt = None,
    denoise_lr_scale: DenoiseLrOpt = 1.0,
    sampler: SamplerOpt = "auto",
    segments: SegmentsOpt = None,
    tol: TolOpt = None,
    check_every: CheckEveryOpt = None,
    precision: PrecisionOpt = "auto",
    cuda_graphs: CudaGraphsOpt = None,
    noise: Annotated[
        Optional[Path],
        typer.Option("--noise", help="Exact prior noise: a .npy of shape (N, T, D).", show_default=False),
    ] = None,
    seed: SeedOpt = 0,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="X.png grid, folder/ of PNGs, X.npz (uint8 NHWC arr_0), X.npy (float32 NCHW), or - (npy on stdout).",
        ),
    ] = "samples.png",
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
        check_sampling_options(
            guide_what, attn_temp, sampler, tol, guidance=guidance, annealed=annealed, check_every=check_every
        )
        check_output(out)
        dev = resolve_device(device)
        check_precision_options(precision, cuda_graphs, dev)
        model, ck = load(ckpt, dev, patch_size)
        cfg = model.config
        segs = parse_segments(segments, len(model.blocks), cfg.num_patches, sampler)
        prior_noise = _read_noise(noise, cfg) if noise is not None else None
        if prior_noise is not None and num is not None and num != len(prior_noise):
            raise UsageError(f"--num {num} does not match --noise {noise}, which holds {len(prior_noise)} rows")
        n = len(prior_noise) if prior_noise is not None else num
        if n is None and labels is not None:  # one image per label
            y = resolve_labels(ck, None, class_=class_, labels_path=labels)
            n = len(y) if y is not None else 64
        else:
            n = n or 64
            y = resolve_labels(ck, n, class_=class_, labels_path=labels)
        sigma = resolve_denoise_sigma(ck, denoise, denoise_sigma, lr_scale=denoise_lr_scale)
        settings = dict(guidance=guidance, guide_what=guide_what, attn_temp=attn_temp, annealed=annealed)
        if verbose:
            info(
                f"checkpoint {ck.path}: {cfg.short_name()} {'NVP' if cfg.nvp else 'VP'}, {cfg.in_channels}x{cfg.img_size}x{cfg.img_size}, "
                f"{cfg.num_classes} classes; device {dev}; seed {seed}; {settings}; denoise sigma {sigma}"
            )
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        with progress_bar("sampling", n) as advance:
            result = generate(
                model,
                n,
                generator=generator,
                batch_size=batch_size,
                labels=y,
                noise=prior_noise,
                denoise_sigma=sigma,
                denoise_lr_scale=denoise_lr_scale,
                on_batch=lambda done, total: advance(done),
                sampler=sampler,
                segments=segs,
                tol=tol,
                check_every=check_every,
                precision=precision,
                cuda_graphs=cuda_graphs,
                **settings,
            )
        seconds = time.perf_counter() - start
        if verbose:
            info(f"sampler: {result.settings}")
        meta = {
            "tarflow_version": __version__,
            "checkpoint": str(ck.path),
            "seed": seed,
            "num": n,
            **settings,
            "sampling": result.settings,
            "denoise_sigma": sigma,
            "denoise_lr_scale": denoise_lr_scale if sigma else None,
            "noise_file": str(noise) if noise else None,
            "redrawn": result.redrawn,
        }
        written = write_output(result.images, out, labels=result.labels, metadata=meta)
        redrawn = f", {result.redrawn} redrawn after non-finite values" if result.redrawn else ""
        info(
            f"sampled {n} images in {seconds:.2f} s ({seconds / n:.3f} s/image{redrawn})"
            + (f" -> {written}" if written else "")
        )
        if out != "-":
            with to_stdout():
                typer.echo(out)


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
