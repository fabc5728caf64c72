"""Checking the sampling options of `sample` and `eval` and turning them into sampler settings."""

from __future__ import annotations

import torch

from tarflow_core.checkpoint import CheckpointInfo
from tarflow_core.sampling import GUIDE_WHAT, PRECISIONS, SAMPLERS

from ..console import UsageError
from ..options import SamplingOptions


def check_sampling_options(opts: SamplingOptions) -> None:
    """The checks that need no model: values, and options that would change nothing."""
    if opts.guide_what not in GUIDE_WHAT:
        raise UsageError(f"--guide-what {opts.guide_what}: expected one of {', '.join(GUIDE_WHAT)}")
    if not opts.attn_temp > 0:
        raise UsageError(f"--attn-temp {opts.attn_temp}: expected a positive number")
    if opts.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {opts.sampler}: expected one of {', '.join(SAMPLERS)}")
    if opts.tol is not None and not opts.tol >= 0:
        raise UsageError(f"--tol {opts.tol}: expected a number >= 0")
    # options that would change nothing are refused, so nobody believes they did
    if opts.sampler == "sequential":
        for name, value in (("--tol", opts.tol), ("--check-every", opts.check_every)):
            if value is not None:
                raise UsageError(
                    f"{name} {value}: only the Jacobi samplers (jacobi, gs-jacobi, auto) take it, "
                    "not --sampler sequential"
                )
    if opts.guidance == 0:
        _refuse_guidance_settings_without_guidance(opts)


def _refuse_guidance_settings_without_guidance(opts: SamplingOptions) -> None:
    for name, given in (
        ("--attn-temp", f" {opts.attn_temp}" if opts.attn_temp != 1.0 else None),
        ("--guide-what", f" {opts.guide_what}" if opts.guide_what != "ab" else None),
        ("--annealed", "" if opts.annealed else None),
    ):
        if given is not None:
            hint = " (it is not a sampling temperature)" if name == "--attn-temp" else ""
            raise UsageError(f"{name}{given}: it shapes the guidance pass, which runs only with --guidance W > 0{hint}")


def check_precision_options(opts: SamplingOptions, device: torch.device) -> None:
    if opts.precision not in PRECISIONS:
        raise UsageError(f"--precision {opts.precision}: expected one of {', '.join(PRECISIONS)}")
    if opts.cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (this run uses {device})")


def parse_segments(text: str | None, blocks: int, tokens: int, sampler: str) -> int | list[int] | None:
    """--segments: one length, or one per block (comma-separated), each at most `tokens` - 1 (the
    unknowns of a block); only for the samplers that take it."""
    if text is None:
        return None
    if sampler not in ("gs-jacobi", "auto"):
        raise UsageError(f"--segments {text}: only --sampler gs-jacobi (or auto) takes segment lengths, not {sampler}")
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or len(values) not in (1, blocks):
        raise UsageError(
            f"--segments {text}: expected a positive integer or {blocks} comma-separated ones (one per block)"
        )
    if max(values) > tokens - 1:
        raise UsageError(
            f"--segments {text}: a segment holds at most {tokens - 1} tokens (the unknowns of a "
            f"{tokens}-token block; that length is plain Jacobi)"
        )
    return values[0] if len(values) == 1 else values


def resolve_denoise_sigma(
    info: CheckpointInfo,
    denoise: bool | None,
    sigma: float | None,
    *,
    flag: str = "--denoise",
    option: str = "--denoise-sigma",
    lr_scale: float = 1.0,
    lr_option: str = "--denoise-lr-scale",
) -> float | None:
    """The denoising step's sigma, or None for no denoising (default: on for Gaussian-noise checkpoints,
    and whenever a sigma is given). `flag` and `option` name the command's switch and sigma option in
    messages; a sigma or step scale given with the step off is refused rather than ignored."""
    explicit_off = denoise is False
    if denoise is None:
        denoise = info.noise_std is not None or sigma is not None
    if not denoise:
        if sigma is not None:
            raise UsageError(f"{option} {sigma}: given with --no-{flag.lstrip('-')}; drop one of them")
        if lr_scale != 1.0:
            raise UsageError(
                f"{lr_option} {lr_scale}: given with --no-{flag.lstrip('-')}; drop one of them"
                if explicit_off
                else f"{lr_option} {lr_scale}: checkpoint {info.path} was not trained with Gaussian noise, "
                f"so sampling does not denoise; give {option} SIGMA to add the step"
            )
        return None
    sigma = sigma if sigma is not None else info.noise_std
    if sigma is None:
        raise UsageError(f"{flag}: checkpoint {info.path} does not record a Gaussian training noise std; give {option}")
    if sigma <= 0:
        raise UsageError(f"{option} {sigma}: expected a positive number")
    return sigma


def sampling_denoise_sigma(info: CheckpointInfo, opts: SamplingOptions) -> float | None:
    """The sigma of the denoising step after sampling (--denoise, --denoise-sigma), or None."""
    return resolve_denoise_sigma(info, opts.denoise, opts.denoise_sigma, lr_scale=opts.denoise_lr_scale)
